"""One row of x times Q4_0 weights on the tensor cores with each 32-group a column of B
(`bench/q4_0_cols.cu`, an exploration outside the engine), against `qgemv`'s one-row Triton
kernel.

Per 8B / 1B linear shape (`bench.quant_decode.linear_shapes`): `auto` (what `qgemv` picks at one
row) and the kernel at each --rb (16-row blocks a warp) and --warps (a CTA's warps, splitting
K's 256-column chunks), each checked against x @ dequantize(W).T in float64 and timed as CUDA
graphs (`bench.common.graph_us`) two ways: over copies of the weight > 4x the L2 (`dram`: what a
decode step does) and over one weight read again and again (`l2`: for the shapes that fit the
L2, what the SMs alone allow; where a kernel's `l2` time stays near its `dram` time, the SMs
are its limit). The kernel is launched with PDL where `qmma`'s launcher would (sm_90).

    python bench/q4_cols_explore.py --configs 8b,1b --rb 1,2 --warps 4,8
    python bench/q4_cols_explore.py --emulate     # CPU: the lane mapping in numpy

`--emulate` runs the kernel's lane / fragment mapping in numpy (the PTX ISA's m16n8k16 layouts)
on small random planes and checks it against the dequantized product: no GPU needed.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SOURCE = Path(__file__).with_name("q4_0_cols.cu")


def kernel_name(rb: int, warps: int, xp: bool = False, glu: bool = False, na: int = 1,
                sa: bool = False) -> str:
    return (f"q4_0_cols_r{rb}_w{warps}" + ("_x" if xp else "") + ("_glu" if glu else "")
            + (f"_a{na}" if na > 1 else "") + ("_s" if sa else ""))


def kernel_source(rb: int, warps: int, xp: bool = False, glu: bool = False, na: int = 1,
                  sa: bool = False) -> str:
    """q4_0_cols.cu with the one kernel of `rb` row blocks a warp and `warps` a CTA (xp: x's
    next chunk loaded ahead too; glu: SiLU*up in the epilogue, half the warps on rb gate row
    blocks, half on the matching up rows; na: independent mma accumulators a chunk; sa: the
    groups' sums of x by ALU)."""
    b = {True: "true", False: "false"}
    return (SOURCE.read_text() + f"\nCOLS_KERNEL({kernel_name(rb, warps, xp, glu, na, sa)}, "
            f"{rb}, {warps}, {b[xp]}, {b[glu]}, {na}, {b[sa]})\n")


# --- the lane mapping in numpy ---------------------------------------------------------------

def _bf16_pair(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A 32-bit register of two bf16 -> (low half, high half) as float64."""
    lo = ((bits & 0xFFFF).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    hi = ((bits >> 16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return lo, hi


def _mma(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """c [32, 4] += A x B for m16n8k16 fragments a [32, 4] and b [32, 2] (uint32 bf16 pairs),
    laid out as the PTX ISA says: lane (g, t) holds A rows g / g + 8 at k 2t, 2t + 1 (a0, a1)
    and 2t + 8, 2t + 9 (a2, a3), B column g at the same k, C rows g / g + 8, columns 2t, 2t + 1."""
    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        g, t = divmod(lane, 4)
        for reg, (row, k) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8),
                                        (g + 8, 2 * t + 8)]):
            A[row, k], A[row, k + 1] = _bf16_pair(np.array(a[lane, reg], dtype=np.uint32))
        for reg, k in enumerate([2 * t, 2 * t + 8]):
            B[k, g], B[k + 1, g] = _bf16_pair(np.array(b[lane, reg], dtype=np.uint32))
    C = A @ B
    for lane in range(32):
        g, t = divmod(lane, 4)
        c[lane] += [C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1]]


def _code_pair(w: np.ndarray) -> np.ndarray:
    return (w & 0x000F000F) | 0x43004300


def _prmt(a: np.ndarray, b: np.ndarray, sel: int) -> np.ndarray:
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    return sum(src[(sel >> (4 * i)) & 7] << (8 * i) for i in range(4))


def _bf16(words: np.ndarray) -> np.ndarray:
    """[..., W] 32-bit words of bf16 pairs -> [..., 2W] float64 (low half first)."""
    lo, hi = _bf16_pair(words.astype(np.uint32))
    return np.stack([lo, hi], -1).reshape(*words.shape[:-1], -1)


def emulate(x: np.ndarray, qs: np.ndarray, d: np.ndarray, rb: int, warps: int,
            sa: bool = False, glu: bool = False) -> np.ndarray:
    """y as the kernel computes it (before its bf16 roundings), float64: x [K] bf16 bits
    (uint16), qs [N, K / 2] uint8, d [N, K / 32] fp16 bits (uint16); y [N], or with glu (a fused
    [2I, K] gate/up weight, each CTA's first warps / 2 warps on its gate rows, the others on the
    up rows I + the same) silu(gate) * up [I]. sa: the groups' sums of x as the lanes' sums of 8
    columns, added over a group's four lanes and shuffled to the lanes whose C holds the group."""
    n, k = qs.shape[0], x.shape[0]
    chunks = k // 256
    words = qs.view("<u4").astype(np.int64)  # [N, K / 8]: a group's 4 words, 4 groups a row
    xw = x.view("<u4").astype(np.int64)  # [K / 2]: word m holds columns 2m, 2m + 1
    dv = d.view(np.float16).astype(np.float64)
    lanes = np.arange(32)
    g, t = lanes // 4, lanes % 4
    own, low = (g & 3) == t, g < 4
    ones = np.full((32, 4), 0x3F803F80, dtype=np.int64)
    wk_n = warps // 2 if glu else warps  # warps splitting K's chunks
    ctas = n // (16 * rb * (2 if glu else 1))
    y = np.zeros(ctas * 16 * rb)
    for cta in range(ctas):
        red = np.zeros((warps, 16 * rb))
        for warp in range(warps):
            half_w, wk = divmod(warp, wk_n)
            base = half_w * (n // 2) if glu else 0
            acc = np.zeros((rb, 2, 32))
            for c in range(wk, chunks, wk_n):
                # x's group g of chunk c, as 16 words per lane (zeros where not own)
                xv = np.where(own[:, None], xw[128 * c + 16 * g[:, None] + np.arange(16)], 0)
                C, S = np.zeros((rb, 32, 4)), np.zeros((32, 4))
                for half in range(2):
                    on = (half == 0) == low
                    for i in range(4):
                        for h in range(2):
                            m = 8 * h + 2 * i
                            bx = _prmt(xv[:, m], xv[:, m + 1], 0x5410)
                            by = _prmt(xv[:, m], xv[:, m + 1], 0x7632)
                            b = np.stack([np.where(on, bx, 0), np.where(on, by, 0)], 1)
                            if not sa:
                                _mma(S, ones, b)
                            s0, s1 = (4, 12) if h else (0, 8)
                            for r in range(rb):
                                row = base + 16 * (cta * rb + r) + g
                                col = 32 * c + 4 * (t + 4 * half) + i  # unit t (+4), word i
                                u, v = words[row, col], words[row + 8, col]
                                a = np.stack([_code_pair(u >> s0), _code_pair(v >> s0),
                                              _code_pair(u >> s1), _code_pair(v >> s1)], 1)
                                _mma(C[r], a, b)
                if sa:  # lane (g, t): columns 8t..8t+7 of group g; then the group's four lanes
                    own8 = _bf16(xw[128 * c + 16 * g[:, None] + 4 * t[:, None] + np.arange(4)])
                    group = own8.sum(1).reshape(8, 4).sum(1).repeat(4)  # [32]: lane's group
                    S[:, 0] = S[:, 2] = group[8 * t]
                    S[:, 1] = S[:, 3] = group[8 * t + 4]
                for r in range(rb):
                    row = base + 16 * (cta * rb + r) + g
                    grp = 8 * c + 2 * t
                    acc[r, 0] += (dv[row, grp] * (C[r][:, 0] - 136 * S[:, 0])
                                  + dv[row, grp + 1] * (C[r][:, 1] - 136 * S[:, 1]))
                    acc[r, 1] += (dv[row + 8, grp] * (C[r][:, 2] - 136 * S[:, 2])
                                  + dv[row + 8, grp + 1] * (C[r][:, 3] - 136 * S[:, 3]))
            for r in range(rb):
                for e in range(2):
                    sums = acc[r, e].reshape(8, 4).sum(1)  # over t: lanes 4g..4g+3
                    red[warp, 16 * r + 8 * e: 16 * r + 8 * e + 8] = sums
        if glu:
            gate, up = red[:wk_n].sum(0), red[wk_n:].sum(0)
            y[16 * rb * cta: 16 * rb * (cta + 1)] = gate / (1 + np.exp(-gate)) * up
        else:
            y[16 * rb * cta: 16 * rb * (cta + 1)] = red.sum(0)
    return y


def random_q4_0(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [K] bf16 bits, qs [N, K / 2] uint8 and d [N, K / 32] fp16 bits of random values."""
    rng = np.random.default_rng(seed)
    x32 = (rng.standard_normal(k) * 0.5).astype(np.float32)
    x = (x32.view(np.uint32) >> 16).astype(np.uint16)  # truncated to bf16: any bf16 will do
    qs = rng.integers(0, 256, size=(n, k // 2), dtype=np.uint8)
    d = (rng.random((n, k // 32)) * 2e-2).astype(np.float16).view(np.uint16)
    return x, qs, d


def dequantized_product(x: np.ndarray, qs: np.ndarray, d: np.ndarray) -> np.ndarray:
    """x @ dequantize(W).T in float64 for the bit arrays of `random_q4_0`."""
    n = qs.shape[0]
    lo, hi = qs & 0x0F, qs >> 4
    codes = np.concatenate([lo.reshape(n, -1, 16), hi.reshape(n, -1, 16)], 2).reshape(n, -1)
    w = (codes.astype(np.float64) - 8) * np.repeat(d.view(np.float16).astype(np.float64), 32, 1)
    xf = (x.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return w @ xf


def glu_product(x: np.ndarray, qs: np.ndarray, d: np.ndarray) -> np.ndarray:
    """silu(gate) * up in float64 of a fused [2I, K] gate/up weight's dequantized product."""
    y = dequantized_product(x, qs, d)
    gate, up = np.split(y, 2)
    return gate / (1 + np.exp(-gate)) * up


def run_emulation() -> int:
    worst = 0.0
    for rb, warps, n, k, sa, glu in [(1, 2, 32, 1024, False, False), (2, 4, 64, 768, True, False),
                                     (4, 2, 64, 256, False, False), (1, 4, 64, 1280, True, True),
                                     (2, 2, 64, 512, False, True)]:
        x, qs, d = random_q4_0(n, k, seed=rb)
        want = (glu_product if glu else dequantized_product)(x, qs, d)
        got = emulate(x, qs, d, rb, warps, sa, glu)
        err = float(np.abs(got - want).max() / np.abs(want).max())
        worst = max(worst, err)
        print(f"rb {rb} warps {warps} N {n} K {k} sa {sa} glu {glu}: max relative error "
              f"{err:.1e}")
    return 0 if worst < 1e-9 else 1


# --- the GPU ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def compiled(device_index: int, rb: int, warps: int, xp: bool, glu: bool, na: int, sa: bool):
    with torch.cuda.device(device_index):
        return torch.cuda._compile_kernel(kernel_source(rb, warps, xp, glu, na, sa),
                                          kernel_name(rb, warps, xp, glu, na, sa))


def cols_matmul(x: torch.Tensor, w, rb: int, warps: int, pdl: bool = True,
                xp: bool = False, glu: bool = False, na: int = 1,
                sa: bool = False) -> torch.Tensor:
    """x [1, K] bf16 @ w.dequantize().T for a Q4_0 `w` [N, K] by the kernel -> [1, N] bf16
    (glu: w a fused [2I, K] gate/up weight, the result silu(gate) * up [1, I])."""
    from llm.backends.torch.kernels import qmma

    n, k = w.shape
    rows = 16 * rb * (2 if glu else 1)  # rows of w a CTA
    if (w.format != "q4_0" or x.shape != (1, k) or n % rows or k % 256
            or (glu and warps % 2)):
        raise ValueError(f"cols_matmul takes x [1, K] and Q4_0 [N, K], N % {rows} == 0, "
                         f"K % 256 == 0 (glu: an even number of warps); got {tuple(x.shape)} and "
                         f"{w.format} {w.shape}, {warps} warps")
    qs, d = w.planes["qs"], w.planes["d"]
    y = torch.empty(1, n // 2 if glu else n, dtype=torch.bfloat16, device=x.device)
    kernel = compiled(x.device.index, rb, warps, xp, glu, na, sa)
    args = [ctypes.c_void_p(t.data_ptr()) for t in (x, qs, d, y)]
    args += [ctypes.c_int(v) for v in (k, qs.stride(0), d.stride(0))]
    params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
    attr = qmma._LaunchAttribute(qmma._PDL_ATTRIBUTE, b"", (ctypes.c_uint64 * 8)(1))
    config = qmma._LaunchConfig((n // rows, 1, 1), (32 * warps, 1, 1), 0,
                                torch.cuda.current_stream(x.device).cuda_stream,
                                ctypes.pointer(attr) if pdl else None, 1 if pdl else 0)
    with torch.cuda.device(x.device):
        err = qmma._libcuda().cuLaunchKernelEx(ctypes.byref(config), kernel.func, params, None)
    if err:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {err}")
    return y


def run_gpu(args) -> int:
    from bench.common import SHAPES, copy_bandwidth, csv, fmt, graph_us, l2_bytes, print_table
    from bench.quant_decode import linear_shapes, random_quantized, weight_copies
    from llm.backends.torch.kernels import qgemv
    from llm.backends.torch.kernels.pdl import use_pdl

    device = torch.device("cuda")
    bw = copy_bandwidth(device)
    l2 = l2_bytes(device)
    gen = torch.Generator(device=device).manual_seed(0)
    rows, best = [], []
    for name in csv(args.configs):
        for lin, (n, k) in linear_shapes(SHAPES[name]).items():
            if args.linears and lin not in csv(args.linears):
                continue
            w0 = random_quantized("q4_0", n, k, gen, device)
            ws = weight_copies(w0, l2)
            x = (torch.randn(1, k, device=device, generator=gen) * 0.5).to(torch.bfloat16)
            ref = x.double() @ w0.dequantize(torch.float64).T
            pdl = use_pdl(x)
            variants = [("auto", lambda w, x=x: qgemv.qgemv(x, w))]
            variants += [(f"cols r{rb} w{wp}{' x' if xp else ''}{f' a{na}' if na > 1 else ''}"
                          f"{' s' if sa else ''}",
                          lambda w, x=x, rb=rb, wp=wp, pdl=pdl, xp=xp, na=na, sa=sa: cols_matmul(
                              x, w, rb, wp, pdl, xp, na=na, sa=sa))
                         for rb in csv(args.rb, int) for wp in csv(args.warps, int)
                         for xp in [bool(int(v)) for v in csv(args.xp)]
                         for na in csv(args.na, int) for sa in [bool(int(v)) for v in csv(args.sa)]
                         if n % (16 * rb) == 0]
            if lin == "gate_up" and args.glu:  # SiLU*up: qgemv's and the kernel's epilogues
                variants += [("auto glu", lambda w, x=x: qgemv.qgemv_silu_mul(x, w))]
                variants += [(f"glu r{rb} w{wp}{f' a{na}' if na > 1 else ''}{' s' if sa else ''}",
                              lambda w, x=x, rb=rb, wp=wp, pdl=pdl, na=na, sa=sa:
                              cols_matmul(x, w, rb, wp, pdl, glu=True, na=na, sa=sa))
                             for rb in csv(args.rb, int)
                             for wp in csv(args.warps, int) if wp % 2 == 0
                             for na in csv(args.na, int)
                             for sa in [bool(int(v)) for v in csv(args.sa)]]
            variants.append(("auto, again", variants[0][1]))
            glu_ref = torch.nn.functional.silu(ref[:, :n // 2]) * ref[:, n // 2:]
            times = {}
            for label, call in variants:
                want = glu_ref if "glu" in label else ref
                err = float((call(w0).double() - want).abs().max() / want.abs().max())
                dram = graph_us([lambda w=w, call=call: call(w) for w in ws], device)
                hot = (graph_us([lambda call=call, w0=w0: call(w0)] * 8, device)
                       if w0.nbytes * 2 < l2 else None)
                times[label] = dram
                rows.append([name, lin, f"{n}x{k}", label, fmt(dram, 1),
                             fmt(100 * w0.nbytes / (dram * 1e-6) / bw, 0),
                             "-" if hot is None else fmt(hot, 1), f"{err:.1e}"])
                print(rows[-1], flush=True)
            fits = [(t, lb) for lb, t in times.items() if lb.startswith("cols")]
            if not fits:  # no launch divides this shape's rows
                continue
            cols = min(fits)
            if "auto glu" in times:
                glu = min((t, lb) for lb, t in times.items() if lb.startswith("glu"))
                best.append([name, "gate_up + SiLU*up", fmt(times["auto glu"], 1), "-",
                             fmt(glu[0], 1), glu[1], f"{times['auto glu'] / glu[0]:.2f}x"])
            best.append([name, lin, fmt(times["auto"], 1), fmt(times["auto, again"], 1),
                         fmt(cols[0], 1), cols[1], f"{times['auto'] / cols[0]:.2f}x"])
            del ws
            torch.cuda.empty_cache()
    print(f"{torch.cuda.get_device_name(device)}, copy bandwidth {bw / 1e12:.2f} TB/s")
    print_table(["config", "linear", "N x K", "variant", "us (dram)", "% copy", "us (l2)",
                 "max rel err"], rows)
    print_table(["config", "linear", "auto us", "auto again", "best cols us", "variant",
                 "auto / cols"], best)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="8b,1b")
    p.add_argument("--linears", default="", help="only these (qkv, o, gate_up, down, head...)")
    p.add_argument("--rb", default="1,2", help="16-row blocks a warp (4 spills with --na > 1)")
    p.add_argument("--warps", default="4,8", help="warps a CTA")
    p.add_argument("--xp", default="0,1", help="x's next chunk loaded ahead: 0, 1 or both")
    p.add_argument("--na", default="1", help="independent mma accumulators a chunk: 1, 2, 4")
    p.add_argument("--sa", default="0", help="the groups' sums of x by ALU: 0, 1 or both")
    p.add_argument("--glu", action="store_true", help="gate_up with SiLU*up in the epilogue too")
    p.add_argument("--emulate", action="store_true", help="the lane mapping in numpy (CPU)")
    args = p.parse_args(argv)
    return run_emulation() if args.emulate else run_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
