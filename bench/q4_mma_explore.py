"""Exploration, not in the engine: Q4_0 for 1..16 rows of x on the tensor cores, below Triton.

Why (docs/performance.md, "Why 8B Q4_0 at batch 1 does not follow the bandwidth"): the one-row
kernel (kernels/qgemv_words.py) spends 3.6 instructions a weight (SASS, Triton 3.6), so its step
is bound by the SMs (the same time on an H100 and an H200), and the tensor-core kernel for 5..16
rows (kernels/qgemm_tc.py) 6, with a wait after each `wgmma`. `bench/q4_0_mma.cu` multiplies the
exact codes (bf16 128 + q) by x on the tensor cores by `mma.sync` m16n8k16: the codes in A (one
16-row block a mma), up to 8 rows of x in B's columns (two B tiles for 16), the group scale and
the offset (d * (C - 136 * sum x)) in float32 after each group's two mmas; a CTA's warps split
K, each streaming its quads of groups through a cp.async ring in shared memory (v3; v1, v2 and
v4 and their H100 timings are in docs/performance.md, "Q4_0 for 1..16 rows of x by mma.sync").
One row of x runs `q4_0_mma_m1` (x in all of B's columns), up to 8 `_m8`, up to 16 `_m16`. It
reads the engine's Q4_0 planes as they are (`qs` [N, K / 2] bytes, `d` [N, K / 32] fp16); N a
multiple of 32, K of 128. On an H100 (2026-12-06): 1.1-1.6x the engine's kernels at 2..8 rows of
x, slower at 1 and 16.

    python bench/q4_mma_explore.py --configs 8b,1b --batches 1,4,16 --warps 4,8 --stages 2,4  # GPU
    python bench/q4_mma_explore.py --emulate                                                # CPU

On a GPU (torch's NVRTC, `torch.cuda._compile_kernel`): per linear shape of the configs and
batch, the kernel at each --warps (warps a CTA: they split K) against `qgemv` (the engine's
choice), both checked against x @ dequantize(W).T in float64 (max relative error; issue 15
asks <= 1e-3) and timed as CUDA graphs over copies of the weight > 4x the L2
(`bench.common.graph_us`). --emulate: the kernel's lane arithmetic in numpy, each mma by the PTX
ISA's fragment layout of m16n8k16 (A rows groupID / + 8, columns 2 * tid (+ 1, + 8, + 9); B rows
2 * tid (..), column groupID; C rows groupID / + 8, columns 2 * tid, + 1), against
dequantize-then-matmul: what makes the column order of codes and x agree.
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
from bench.quant_decode import (  # noqa: E402
    linear_shapes,
    random_quantized,
    weight_copies,
)
from llm.model.quant.tensor import QuantizedTensor  # noqa: E402

SOURCE = Path(__file__).with_name("q4_0_mma.cu")
ROWS = 32  # rows of w a CTA
STAGE_BYTES = 32 * 80 + 32 * 8  # a quad's stage of a warp's ring (q4_0_mma.cu's STAGE)


def kernel_name(m: int) -> str:
    """The kernel for m rows of x: x in all of B's columns for one row, else 8 rows a B tile."""
    if not 1 <= m <= 16:
        raise ValueError(f"the mma kernel takes 1..16 rows of x, not {m}")
    return "q4_0_mma_m1" if m == 1 else ("q4_0_mma_m8" if m <= 8 else "q4_0_mma_m16")


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


def emulate(w: QuantizedTensor, x: np.ndarray, warps: int, splits: int = 1) -> np.ndarray:
    """`kernel_name(M)`'s result for x [M, K] (float32 holding bf16 values) and Q4_0 `w`, lane by
    lane as bench/q4_0_mma.cu computes it, K's quads cut in `splits` slices (CTAs) and each slice's
    among `warps` warps; [M, N]."""
    n, k = w.shape
    m_rows = x.shape[0]
    one = m_rows == 1
    tiles = 1 if m_rows <= 8 else 2
    words = w.planes["qs"].contiguous().numpy().view("<u4")  # [N, K / 8]
    d = w.planes["d"].float().numpy()
    quads = k // 128
    sx = 136.0 * x.reshape(m_rows, -1, 32).sum(2)  # [M, groups]
    y = np.zeros((m_rows, n))
    for blk in range(n // ROWS):
        part = np.zeros((splits * warps, ROWS, m_rows))
        for sw in range(splits * warps):
            sl, warp = divmod(sw, warps)
            s_lo, s_hi = quads * sl // splits, quads * (sl + 1) // splits
            q_lo = s_lo + (s_hi - s_lo) * warp // warps
            q_hi = s_lo + (s_hi - s_lo) * (warp + 1) // warps
            acc = np.zeros((2, tiles, 32, 4))  # [16-row block][tile][lane][c0..c3]
            for gi in range(4 * q_lo, 4 * q_hi):
                for nt in range(tiles):
                    c = np.zeros((2, 32, 4))
                    for shift, xoff in ((0, 0), (4, 16)):
                        a, b = ([], []), []
                        for lane in range(32):
                            g, t = lane >> 2, lane & 3
                            r0 = blk * ROWS + g
                            ws = [int(words[r0 + 8 * i, 4 * gi + t]) for i in range(4)]
                            for blk16 in range(2):
                                w0, w1 = ws[2 * blk16], ws[2 * blk16 + 1]
                                a[blk16].append((_pair(w0, shift, 0), _pair(w1, shift, 0),
                                                 _pair(w0, shift, 2), _pair(w1, shift, 2)))
                            row = 0 if one else 8 * nt + g
                            if row < m_rows:
                                at = 32 * gi + xoff + 4 * t
                                xs = x[row, at:at + 4]
                            else:
                                xs = np.zeros(4)
                            b.append(((xs[0], xs[1]), (xs[2], xs[3])))
                        _mma(c[0], a[0], b)
                        _mma(c[1], a[1], b)
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        r0 = blk * ROWS + g
                        cols = (0, 0) if one else (8 * nt + 2 * t, 8 * nt + 2 * t + 1)
                        s = [sx[col, gi] if col < m_rows else 0.0 for col in cols]
                        for blk16 in range(2):
                            d0, d1 = d[r0 + 16 * blk16, gi], d[r0 + 16 * blk16 + 8, gi]
                            cc = c[blk16][lane]
                            acc[blk16, nt, lane] += (d0 * (cc[0] - s[0]), d0 * (cc[1] - s[1]),
                                                     d1 * (cc[2] - s[0]), d1 * (cc[3] - s[1]))
            for lane in range(32):  # the partials as the kernel stores them
                g, t = lane >> 2, lane & 3
                for blk16 in range(2):
                    for nt in range(tiles):
                        row = 16 * blk16 + g
                        if one:
                            if t == 0:
                                part[sw, row, 0] = acc[blk16, nt, lane, 0]
                                part[sw, row + 8, 0] = acc[blk16, nt, lane, 2]
                            continue
                        for i, (dr, col) in enumerate(((0, 2 * t), (0, 2 * t + 1), (8, 2 * t),
                                                       (8, 2 * t + 1))):
                            if 8 * nt + col < m_rows:
                                part[sw, row + dr, 8 * nt + col] = acc[blk16, nt, lane, i]
        y[:, blk * ROWS:(blk + 1) * ROWS] = part.sum(0).T
    return y


def run_emulation() -> int:
    """--emulate: a random Q4_0 matrix of 32 x 512 at 1, 5 and 11 rows of x (the three
    kernels), over 2 and 3 warps and 1, 2 and 3 slices of K (uneven quads)."""
    g = torch.Generator().manual_seed(0)
    w = random_quantized("q4_0", 32, 512, g, torch.device("cpu"))
    for m, warps, splits in ((1, 2, 1), (5, 3, 2), (11, 2, 3)):
        x = torch.randn(m, 512, generator=g).to(torch.bfloat16).float()
        ref = (x.double() @ w.dequantize(torch.float64).T).numpy()
        err = float(np.abs(emulate(w, x.numpy(), warps, splits) - ref).max()
                    / np.abs(ref).max())
        print(f"emulated {kernel_name(m)}, {m} rows, {warps} warps, {splits} slices of K: "
              f"max relative error {err:.1e}")
        if err > 1e-6:
            return 1
    return 0


def mma_call(kernels: dict, x: torch.Tensor, y: torch.Tensor, warps: int, splits: int,
             stages: int):
    """The kernel for x [M, K] (bf16) as a function of the weight, K cut in `splits` slices (CTAs
    a row block); y [M, N] bf16 its output."""
    m, n = y.shape
    kernel = kernels[kernel_name(m), stages]
    mp = 1 if m == 1 else (8 if m <= 8 else 16)
    part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    cnt = torch.zeros(n // ROWS, dtype=torch.int32, device=x.device)

    def call(w: QuantizedTensor) -> torch.Tensor:
        k = w.shape[1]
        qs, d = w.planes["qs"], w.planes["d"]
        sx = -(-4 * max(mp * 4 * -(-(k // 128) // splits), warps * ROWS * mp) // 16) * 16
        smem = sx + warps * stages * STAGE_BYTES
        kernel(grid=(n // ROWS, splits, 1), block=(32 * warps, 1, 1),
               args=[x, qs, d, y, part, cnt, m, n, k, qs.stride(0) // 4, d.stride(0),
                     x.stride(0), y.stride(0)], shared_mem=smem)
        return y
    return call


def auto_splits(n: int, k: int, sms: int) -> int:
    """Slices of K for an N x K weight: enough CTAs for ~4 a SM, each slice >= 8 quads."""
    return max(1, min(-(-4 * sms // (n // ROWS)), (k // 128) // 8))


def run_gpu(args) -> int:
    """The check and the timing table on a GPU (see the module docstring)."""
    from llm.backends.torch.kernels.qgemv import qgemv

    if not hasattr(torch.cuda, "_compile_kernel"):
        raise SystemExit(f"torch {torch.__version__} has no torch.cuda._compile_kernel (NVRTC)")
    device = torch.device("cuda")
    source = SOURCE.read_text()
    kernels = {(name, st): torch.cuda._compile_kernel(f"#define STAGES_N {st}\n" + source, name)
               for name in ("q4_0_mma_m1", "q4_0_mma_m8", "q4_0_mma_m16")
               for st in csv(args.stages, int)}
    optin = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    for kernel in kernels.values():
        kernel.set_shared_memory_config(optin - 4096)  # room for the static shared memory
    bw = copy_bandwidth(device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name in csv(args.configs):
        for lin, (n, k) in linear_shapes(SHAPES[name]).items():
            if n % ROWS or k % 128:
                print(f"{name} {lin} {n}x{k}: not a multiple of 32 rows / 128 columns, skipped")
                continue
            w0 = random_quantized("q4_0", n, k, g, device)
            ws = weight_copies(w0, l2_bytes(device))
            wd = w0.dequantize(torch.float64)
            for m in csv(args.batches, int):
                x = (torch.randn(m, k, device=device, generator=g) * 0.5).to(torch.bfloat16)
                ref = x.double() @ wd.T
                y = torch.empty(m, n, device=device, dtype=torch.bfloat16)
                variants = [("auto", lambda w, x=x: qgemv(x, w))]
                sk = auto_splits(n, k, sms)
                variants += [(f"mma w{v} s{s} st{st}", mma_call(kernels, x, y, v, s, st))
                             for v in csv(args.warps, int) for s in sorted({1, sk})
                             for st in csv(args.stages, int)]
                for label, call in variants:
                    out = call(w0).clone()
                    err = float((out.double() - ref).abs().max() / ref.abs().max())
                    us = graph_us([lambda w=w, call=call: call(w) for w in ws], device)
                    if not torch.equal(call(w0), out):  # the slices' counters were left at 0
                        raise SystemExit(f"{name} {lin} {m} rows {label}: not the same bits")
                    rows.append([name, lin, f"{n}x{k}", m, label, fmt(us, 1),
                                 fmt(100 * w0.nbytes / (us * 1e-6) / bw, 0), f"{err:.1e}"])
                    print(rows[-1], flush=True)
            del ws, wd
            torch.cuda.empty_cache()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    print_table(["config", "linear", "N x K", "rows of x", "variant", "us", "% copy",
                 "max rel err"], rows)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="8b,1b")
    p.add_argument("--batches", default="1,4,16", help="comma list of rows of x (1..16)")
    p.add_argument("--warps", default="2,4,8", help="comma list of warps a CTA (at most 8)")
    p.add_argument("--stages", default="4", help="comma list of a warp's ring stages (>= 2)")
    p.add_argument("--emulate", action="store_true", help="the lane mapping in numpy (CPU)")
    args = p.parse_args(argv)
    if args.emulate:
        return run_emulation()
    if not torch.cuda.is_available():
        raise SystemExit("the kernel needs a CUDA GPU (--emulate checks its lane mapping here)")
    if any(not 1 <= v <= 8 for v in csv(args.warps, int)):
        raise SystemExit("--warps: 1..8 warps a CTA")
    if any(v < 2 for v in csv(args.stages, int)):
        raise SystemExit("--stages: at least 2")
    if any(not 1 <= v <= 16 for v in csv(args.batches, int)):
        raise SystemExit("--batches: 1..16 rows of x")
    return run_gpu(args)


if __name__ == "__main__":
    raise SystemExit(main())
