"""Exploration, not in the engine: Q4_0 at batch 1 on the tensor cores, below Triton.

Why (docs/performance.md, "Why 8B Q4_0 at batch 1 does not follow the bandwidth"): the one-row
kernel (kernels/qgemv_words.py) spends 3.6 instructions a weight (SASS, Triton 3.6), so its step
is bound by the SMs (the same time on an H100 and an H200). `bench/q4_0_mma.cu` multiplies the
exact codes (bf16 128 + q) by x on the tensor cores by `mma.sync` m16n8k16, x in B's columns, one
16-row block per mma, the group scale and the offset (d * (C - 136 * sum x)) in float32 after
each group's two mmas: 1.9 instructions a weight in its loop (SASS of sm_90, CUDA 12.9 NVRTC).
It reads the engine's Q4_0 planes as they are (`qs` [N, K / 2] bytes, `d` [N, K / 32] fp16);
N a multiple of 32 and K of 128.

    python bench/q4_mma_explore.py --configs 8b,1b --warps 2,4,8   # a GPU: check, then time
    python bench/q4_mma_explore.py --emulate                       # the CPU: the lane mapping

On a GPU (torch's NVRTC, `torch.cuda._compile_kernel`): per linear shape of the configs, the
kernel at each --warps (warps a CTA: they split K) against `qgemv` (the engine's choice), both
checked against x @ dequantize(W).T in float64 (max relative error; issue 15 asks <= 1e-3) and
timed as CUDA graphs over copies of the weight > 4x the L2 (`bench.common.graph_us`).
--emulate: the kernel's lane arithmetic in numpy, each mma by the PTX ISA's fragment layout of
m16n8k16 (A rows groupID / +8, columns 2 * tid (+1, +8, +9); B rows 2 * tid.., column groupID;
C likewise), against dequantize-then-matmul: what makes the column order of the codes right.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench  # noqa: E402, F401
from bench.common import (  # noqa: E402
    SHAPES,
    copy_bandwidth,
    csv,
    fmt,
    graph_us,
    l2_bytes,
    print_table,
)
from bench.quant_decode import linear_shapes, random_quantized  # noqa: E402
from llm.model.quant.tensor import QuantizedTensor  # noqa: E402

SOURCE = Path(__file__).with_name("q4_0_mma.cu")
ROWS = 32  # rows a CTA


def _pair(word: int, shift: int, first: int) -> tuple[float, float]:
    """The bf16 pair a `prmt` makes of bytes first, first + 1 of (word >> shift) & 0x0F0F0F0F."""
    nib = (word >> shift) & 0x0F0F0F0F
    return tuple(128.0 + ((nib >> (8 * b)) & 0xFF) for b in (first, first + 1))


def _mma(c: np.ndarray, a: list, b: list) -> None:
    """c [32 lanes, 4] += A @ B of one m16n8k16 from the lanes' fragments (PTX ISA layout)."""
    am, bm = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        am[g, 2 * t:2 * t + 2], am[g + 8, 2 * t:2 * t + 2] = a[lane][0], a[lane][1]
        am[g, 2 * t + 8:2 * t + 10], am[g + 8, 2 * t + 8:2 * t + 10] = a[lane][2], a[lane][3]
        bm[2 * t:2 * t + 2, g], bm[2 * t + 8:2 * t + 10, g] = b[lane][0], b[lane][1]
    cm = am @ bm
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        c[lane] += (cm[g, 2 * t], cm[g, 2 * t + 1], cm[g + 8, 2 * t], cm[g + 8, 2 * t + 1])


def emulate(w: QuantizedTensor, x: np.ndarray, warps: int) -> np.ndarray:
    """The kernel's result for float32 x (bf16 values) [K] and Q4_0 `w`, lane by lane."""
    n, k = w.shape
    words = w.planes["qs"].contiguous().numpy().view("<u4")  # [N, K / 8]
    d = w.planes["d"].float().numpy()
    quads = k // 128
    sx = x.reshape(-1, 32).sum(1)
    y = np.zeros(n)
    for blk in range(n // ROWS):
        part = np.zeros((warps, ROWS))
        for warp in range(warps):
            acc = np.zeros((32, 4))
            for gi in range(4 * (quads * warp // warps), 4 * (quads * (warp + 1) // warps)):
                c, e = np.zeros((32, 4)), np.zeros((32, 4))
                for shift, xoff in ((0, 0), (4, 16)):
                    a0, a1, b = [], [], []
                    for lane in range(32):
                        r0, t = blk * ROWS + (lane >> 2), lane & 3
                        ws = [int(words[r0 + 8 * m, 4 * gi + t]) for m in range(4)]
                        a0.append((_pair(ws[0], shift, 0), _pair(ws[1], shift, 0),
                                   _pair(ws[0], shift, 2), _pair(ws[1], shift, 2)))
                        a1.append((_pair(ws[2], shift, 0), _pair(ws[3], shift, 0),
                                   _pair(ws[2], shift, 2), _pair(ws[3], shift, 2)))
                        xs = x[32 * gi + xoff + 4 * t:32 * gi + xoff + 4 * t + 4]
                        b.append(((xs[0], xs[1]), (xs[2], xs[3])))
                    _mma(c, a0, b)
                    _mma(e, a1, b)
                s = 136.0 * sx[gi]
                for lane in range(32):
                    r0 = blk * ROWS + (lane >> 2)
                    acc[lane] += [d[r0 + 8 * m, gi] * (v - s) for m, v in
                                  enumerate((c[lane][0], c[lane][2], e[lane][0], e[lane][2]))]
            for lane in range(0, 32, 4):  # lanes with tid 0 write their four rows
                part[warp, [lane >> 2, (lane >> 2) + 8, (lane >> 2) + 16, (lane >> 2) + 24]] = \
                    acc[lane]
        y[blk * ROWS:(blk + 1) * ROWS] = part.sum(0)
    return y


def run_emulation() -> int:
    """--emulate: a random Q4_0 matrix of 64 x 512 over 2 and 3 warps (uneven quads)."""
    g = torch.Generator().manual_seed(0)
    w = random_quantized("q4_0", 64, 512, g, torch.device("cpu"))
    x = torch.randn(512, generator=g).to(torch.bfloat16).float()
    ref = (w.dequantize(torch.float64) @ x.double()).numpy()
    for warps in (2, 3):
        err = float(np.abs(emulate(w, x.numpy(), warps) - ref).max() / np.abs(ref).max())
        print(f"emulated, {warps} warps: max relative error {err:.1e}")
        if err > 1e-6:
            return 1
    return 0


def mma_call(kernel, x: torch.Tensor, y: torch.Tensor, warps: int):
    """The kernel as a function of the weight (x [K] bf16, y [N] bf16 its output)."""
    def call(w: QuantizedTensor) -> torch.Tensor:
        n, k = w.shape
        qs, d = w.planes["qs"], w.planes["d"]
        kernel(grid=(n // ROWS, 1, 1), block=(32 * warps, 1, 1),
               args=[x, qs, d, y, n, k, qs.stride(0) // 4, d.stride(0)], shared_mem=k // 32 * 4)
        return y
    return call


def run_gpu(args) -> int:
    """The check and the timing table on a GPU (see the module docstring)."""
    from llm.backends.torch.kernels.qgemv import qgemv

    if not hasattr(torch.cuda, "_compile_kernel"):
        raise SystemExit(f"torch {torch.__version__} has no torch.cuda._compile_kernel (NVRTC)")
    device = torch.device("cuda")
    kernel = torch.cuda._compile_kernel(SOURCE.read_text(), "q4_0_mma_gemv")
    bw = copy_bandwidth(device)
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name in csv(args.configs):
        for lin, (n, k) in linear_shapes(SHAPES[name]).items():
            if n % ROWS or k % 128:
                print(f"{name} {lin} {n}x{k}: not a multiple of 32 rows / 128 columns, skipped")
                continue
            w0 = random_quantized("q4_0", n, k, g, device)
            copies = max(2, -(-4 * l2_bytes(device) // w0.nbytes))
            ws = [w0] + [QuantizedTensor("q4_0", w0.shape, {p: t.clone() for p, t in
                                                             w0.planes.items()})
                         for _ in range(copies - 1)]
            x = (torch.randn(1, k, device=device, generator=g) * 0.5).to(torch.bfloat16)
            ref = (x.double() @ w0.dequantize(torch.float64).T)[0]
            y = torch.empty(n, device=device, dtype=torch.bfloat16)
            variants = [("auto", lambda w, x=x: qgemv(x, w)[0])]
            variants += [(f"mma w{v}", mma_call(kernel, x[0], y, v))
                         for v in csv(args.warps, int)]
            for label, call in variants:
                out = call(w0).double()
                torch.cuda.synchronize()
                err = float((out - ref).abs().max() / ref.abs().max())
                us = graph_us([lambda w=w, call=call: call(w) for w in ws], device)
                rows.append([name, lin, f"{n}x{k}", label, fmt(us, 1),
                             fmt(100 * w0.nbytes / (us * 1e-6) / bw, 0), f"{err:.1e}"])
                print(rows[-1], flush=True)
            del ws
            torch.cuda.empty_cache()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    print_table(["config", "linear", "N x K", "variant", "us", "% copy", "max rel err"], rows)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="8b,1b")
    p.add_argument("--warps", default="2,4,8", help="comma list of warps a CTA (at most 8)")
    p.add_argument("--emulate", action="store_true", help="the lane mapping in numpy (CPU)")
    args = p.parse_args(argv)
    if args.emulate:
        return run_emulation()
    if not torch.cuda.is_available():
        raise SystemExit("the kernel needs a CUDA GPU (--emulate checks its lane mapping here)")
    if any(not 1 <= v <= 8 for v in csv(args.warps, int)):
        raise SystemExit("--warps: 1..8 warps a CTA")
    return run_gpu(args)


if __name__ == "__main__":
    raise SystemExit(main())
