"""GGUF block weights as stored times 2..16 rows of x (32- and 64-row kernels built, not yet run on
a GPU) on the tensor cores (`mma.sync`): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K, and the
formats of weights quantized at load, int8 (Q8_0's codes with a float32 scale a row) and int4_g128
(Q4_1's codes and formula with a bf16 d and m per 128 columns).

The kernel is CUDA C (`qmma.cu` beside this file), compiled at first use on each GPU by torch's
NVRTC (`torch.cuda._compile_kernel`: no nvcc, no build step) and launched here with
`cuLaunchKernelEx`, so that it takes part in programmatic dependent launch like the Triton decode
kernels (kernels/pdl.py): its first weight copies start while the kernel before it finishes.

Why: `qgemv`'s one-row kernel pays its CUDA-core work (decode, scale, multiply-add) once for each
row of x, and Triton's `tl.dot` kernel for 4..16 rows waits after every `wgmma` for the group's
scale. This kernel multiplies the exact codes (bf16 q - 8, q - 16, q - 32 for the symmetric
formats, 128 + q for the affine ones; Q8_0's bytes as two nibble codes) with x by m16n8k16
`mma.sync` and applies each 32-group's (Q6_K: 16-column sub-block's) scale, and the affine
formats' offset times the group's sum of x (an mma of ones), in float32 (qmma.cu's header lists
them per format); the codes stream through a `cp.async` ring per warp, x is read once, by the
mmas. The products are exact and the sums float32, so this is dequantize-then-matmul up to the
order and rounding of float32 sums; the affine formats' offset subtraction (and, less, Q8_0's
codes, 128 + low nibble beside 16 (high - 16)) magnify that rounding, and the tests hold it to
issue 15's 1e-3 of the largest output. Measured on an H100
(docs/performance.md, "Q4_K through the same kernel" and "Every GGUF block format through the
tensor-core kernel"): `mma_rows` is the rule that measurement gave.
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from pathlib import Path

import torch

from llm.backends.torch.kernels.pdl import use_pdl
from llm.backends.torch.kernels.splitk import tile_counters
from llm.model.quant.tensor import QuantizedTensor

SOURCE = Path(__file__).with_name("qmma.cu")
FORMATS = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k", "int8", "int4_g128")
ROWS = 32  # rows of w a CTA (a half of the CTA where `cta_halves` gives it two)
WARPS = 8  # warps a CTA: they split K
MAX_ROWS = 64  # rows of x a launch takes: B tiles of 8 rows, 1, 2, 4 or 8 of them (_m8 .. _m64)
NARROW_WARPS = 4  # warps a CTA of the 16-row launches over wide grids (`cta_warps`)
STAGES = 4  # quads of groups a warp's ring holds where the grid is no larger than the GPU
STAGES_WIDE = 2  # ... where it has more CTAs than the GPU has SMs (`ring_stages`)
OCCUPANCY = 2  # CTAs of 256 threads an SM the registers are fitted to (128 a thread)
OCCUPANCY_FLAGS = ("o1", "o3", "o4")  # kernel-name flags of the other fits (255, 85, 64
# registers a thread)
_PDL_ATTRIBUTE = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


def stage_bytes(fmt: str) -> int:
    """One quad of a CTA's (or half's) 32 rows in a warp's ring (qmma.cu's `stage_bytes`): per
    row its codes and high bits, padded (Q8_0 144 bytes, Q6_K 112, the others 80), then its
    scales (Q4_1 / Q5_1 16 bytes, the others 8; int8 / int4_g128 leave them unused)."""
    row = 144 if fmt in ("q8_0", "int8") else (112 if fmt == "q6_k" else 80)
    return ROWS * row + ROWS * (16 if fmt in ("q4_1", "q5_1") else 8)


def mma_rows(fmt: str, m: int, n: int, k: int) -> bool:
    """Whether `qgemv` sends m rows of x times a [n, k] weight in `fmt` to this kernel: one of
    FORMATS, n a multiple of 32 and k of 128, and where it measured faster than `qgemv`'s Triton
    kernels on an H100: 4..16 rows; 2..3 where N >= 3,072 (docs/performance.md, "x read once:
    no sums of x in the prologue" and "Two and three rows on the narrow linears"). Not 17..64
    (the `_m32` / `_m64` kernels, which kernels/qgemm_batch.py would take where this says so):
    not yet run on a GPU ("qmma with four and eight B tiles"); `bench/quant_decode.py
    --qmma-batches` times them against the Triton kernel."""
    if fmt not in FORMATS or n <= 0 or k <= 0 or n % ROWS or k % 128:
        return False
    return 4 <= m <= 16 or (2 <= m <= 3 and n >= 3072)


def ring_stages(n: int, device: torch.device, splits: int = 1, halves: int = 1) -> int:
    """A warp's ring depth for a weight of n rows launched with `splits` CTAs along K and CTAs of
    `halves` x 32 rows: 2 where its n / (32 halves) * splits CTAs outnumber the GPU's SMs (two
    CTAs a SM can then run side by side where their shared memory fits, which 4 stages of Q6_K
    or Q8_0 never do), else 4 (one CTA a SM, a deeper ring). Measured on an H100 without splits,
    docs/performance.md, "Every GGUF block format through the tensor-core kernel"."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return STAGES_WIDE if n // (ROWS * halves) * splits > sms else STAGES


def k_splits(m: int, n: int, k: int, sms: int, warps: int = WARPS, halves: int = 1) -> int:
    """CTAs along K for x of m rows and a weight of n rows and k columns on a GPU of `sms` SMs,
    CTAs of `halves` x 32 rows and `warps` warps.
    Only where K is at least twice N (the down projections: a long K loop a CTA, a grid of
    n / 32 CTAs near one wave): as many as bring the grid to about two CTAs a SM, at most 4,
    every warp of a split keeping at least two quads of K. 1 elsewhere: the o and QKV projections
    lose 0.5-2 us a call to the partials' round trip (H100, docs/performance.md, "Split-K for the
    grids smaller than the GPU"). `m` is not used by the rule; benchmarks try rules that use it."""
    del m
    if k < 2 * n:
        return 1
    return max(1, min(4, 2 * sms // max(1, n // (ROWS * halves)), k // 256 // (warps // halves)))


def cta_halves(m: int, n: int, k: int, sms: int) -> int:
    """Rows of a CTA in halves of 32 (1 or 2) that the fused gate/up launch (`glu_epilogue`)
    may take for x of m rows and a [n, k] weight on a GPU of `sms` SMs: 2 where the 64-row grid
    still gives about two CTAs a SM (n / 64 >= 2 sms less an eighth: the gate_up projections),
    else 1. Two halves read x once for 64 rows; fewer CTAs lose more on the narrower shapes
    (H100: 8B / 1B gate_up 2-13% faster, qkv and o 15-60% slower; docs/performance.md, "What x's
    reads cost the kernel at 8..16 rows"). Other launches take one half: without the epilogue,
    two lost on the 8B heads (7-16%) and in decode at two rows (H100, "Outcome: the branches on
    the GPU"). `m` and `k` are not used by the rule."""
    del m, k
    return 2 if n % (2 * ROWS) == 0 and n // (2 * ROWS) >= 2 * sms - sms // 8 else 1


def cta_warps(m: int, n: int, k: int, sms: int, halves: int = 1) -> int:
    """Warps of a CTA (they split its K) for x of m rows and a [n, k] weight on a GPU of `sms`
    SMs, CTAs of `halves` x 32 rows: NARROW_WARPS where x has more than 8 rows (two B tiles),
    the CTA one half and the grid at least two CTAs an SM without a split (n / 32 >= 2 sms,
    k < 2n: the LM heads, a gate/up product without the epilogue), so each warp walks twice the
    K and the partials to add are half; WARPS elsewhere (the grids of about a wave or less, qkv,
    o, down, lose warps in flight: 2-31% slower with 4; the two-half launches already give each
    half 4). H100: the 8B / 1B heads at 16 rows 4-16% faster, decode at batch 16 +0.5% (8B Q4_0)
    to +1.9% (1B Q8_0); at 8 rows mixed (docs/performance.md, "Four warps for the 16-row launches
    over wide grids")."""
    if m > 8 and halves == 1 and k < 2 * n and n // ROWS >= 2 * sms:
        return NARROW_WARPS
    return WARPS


def glu_epilogue(m: int, n: int, k: int, sms: int) -> bool:
    """Whether `qgemv_silu_mul` takes SiLU*up in the kernel's epilogue for x of m rows and a
    fused [n = 2I, k] gate/up weight (one launch, y [M, I], no `silu_mul` after it): where the
    weight already gets two halves (`cta_halves`) and no split (`k_splits`), as the epilogue
    needs (gate rows in one half, up rows in the other; both sums whole), so its sums are the
    unfused launch's. H100, 8B Q4_0 decode 3-8% faster at 2..16 rows, 1B 5-9%
    (docs/performance.md, "SiLU*up in the kernel's epilogue")."""
    return cta_halves(m, n, k, sms) == 2 and k_splits(m, n, k, sms, WARPS, 2) == 1


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: id, padding, a 64-byte union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_uint64 * 8)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3),
                ("shared_mem", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


@functools.lru_cache(maxsize=1)
def _libcuda() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p,
                                     ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    return lib


def kernel_source(name: str, stages: int) -> str:
    """qmma.cu with a ring of `stages` and the one kernel `name` (`kernel_name`'s: e.g.
    q6_k_mma_m8, q4_0_mma_m16_h2_s, q4_0_mma_m16_glu: SiLU*up in the epilogue, or
    q4_0_mma_m8_o3: registers fitted to 3 CTAs of 256 threads an SM) instantiated."""
    fmt, rows = name.rsplit("_mma_", 1)
    rows, *flags = rows.split("_")
    tiles, one = {"m1": (1, 1), "m8": (1, 0), "m16": (2, 0), "m32": (4, 0), "m64": (8, 0)}[rows]
    occ = [f for f in flags if f in OCCUPANCY_FLAGS]
    if not set(flags) - set(occ) <= {"h2", "s", "glu"} or len(occ) > 1:
        raise ValueError(f"no tensor-core kernel is named {name}")
    glu = "glu" in flags
    halves = 2 if glu or "h2" in flags else 1
    return (f"#define STAGES_N {stages}\n" + SOURCE.read_text()
            + f"\nKERNEL({name}, {fmt.upper()}, {tiles}, {one}, {halves}, {int('s' in flags)}, "
            f"{int(glu)}, {int(occ[0][1:]) if occ else OCCUPANCY})\n")


@functools.lru_cache(maxsize=64)
def _compiled(device_index: int, name: str, stages: int) -> object:
    """The kernel `name` with a ring of `stages`, compiled for and loaded on GPU `device_index`,
    allowed the shared memory the GPU has; an Exception (returned, not raised) where it cannot
    be. Either answer is kept for the process: a failure (warned once) leaves `qgemv` on its
    Triton kernels from then on. The engine compiles in its warm-up, before any CUDA graph is
    captured."""
    try:
        if not hasattr(torch.cuda, "_compile_kernel"):
            raise RuntimeError(f"torch {torch.__version__} has no torch.cuda._compile_kernel")
        with torch.cuda.device(device_index):
            kernel = torch.cuda._compile_kernel(kernel_source(name, stages), name)
            kernel.set_shared_memory_config(_shared_limit(device_index))
        if not isinstance(getattr(kernel, "func", None), ctypes.c_void_p):
            raise RuntimeError("torch's compiled kernel exposes no CUfunction")
        return kernel
    except Exception as e:  # noqa: BLE001 (NVRTC, the driver: any failure means "not here")
        warnings.warn(f"the tensor-core kernel {name} cannot run on cuda:{device_index} "
                      f"({e}); qgemv's Triton kernels serve instead", RuntimeWarning,
                      stacklevel=3)
        return e


def _aligned(t: torch.Tensor, stride_mult: int, base: int) -> bool:
    return t.stride(1) == 1 and t.stride(0) % stride_mult == 0 and t.data_ptr() % base == 0


def shared_bytes(fmt: str, m: int, warps: int = WARPS, stages: int = STAGES) -> int:
    """Dynamic shared memory of a launch: the warps' partials (float32 [warps, 32, rows of x
    padded to 1, 8, 16, 32 or 64]), then the warps' rings (a quad of groups a stage, whatever
    K)."""
    mp = 1 if m == 1 else max(8, 1 << (m - 1).bit_length())
    return -(-4 * warps * ROWS * mp // 16) * 16 + warps * stages * stage_bytes(fmt)


def _shared_limit(device_index: int) -> int:
    """What `_compiled` allows a launch: the GPU's opt-in limit less 1 KB."""
    return torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin - 1024


def planes_aligned(x: torch.Tensor, w: QuantizedTensor) -> bool:
    """Whether x's rows and w's planes start where the kernel's loads and copies need: x, qs and
    qh at 16 bytes (rows too); d per 32-group (and Q4_1 / Q5_1's m, one row stride) and Q6_K's
    scales at 8; Q4_K / Q5_K's scales and mins at 4 with one row stride, d / dmin with one
    (int4_g128's d / m likewise, int8's d at 4); unit column strides."""
    p, fmt = w.planes, w.format
    if not (_aligned(x, 8, 16) and _aligned(p["qs"], 16, 16)):
        return False
    if "qh" in p and not _aligned(p["qh"], 16, 16):
        return False
    if fmt in ("q4_0", "q5_0", "q8_0"):
        return _aligned(p["d"], 4, 8)
    if fmt == "int8":  # a float32 per row, read by itself
        return _aligned(p["d"], 1, 4)
    if fmt == "int4_g128":  # a bf16 d and m per row and quad, read by themselves
        return (_aligned(p["d"], 1, 2) and _aligned(p["m"], 1, 2)
                and p["d"].stride(0) == p["m"].stride(0))
    if fmt in ("q4_1", "q5_1"):
        return (_aligned(p["d"], 4, 8) and _aligned(p["m"], 4, 8)
                and p["d"].stride(0) == p["m"].stride(0))
    if fmt == "q6_k":
        return _aligned(p["scales"], 8, 8) and _aligned(p["d"], 1, 2)
    return (_aligned(p["scales"], 4, 4) and _aligned(p["mins"], 4, 4)
            and p["scales"].stride(0) == p["mins"].stride(0)
            and _aligned(p["d"], 1, 2) and _aligned(p["dmin"], 1, 2)
            and p["d"].stride(0) == p["dmin"].stride(0))


def launch_shape(m: int, n: int, k: int, device: torch.device,
                 glu: bool = False) -> tuple[int, int, int, int]:
    """(halves, warps, splits, stages) of the engine's launch for x of m rows and a [n, k]
    weight on `device` (`qmma_matmul`'s defaults): glu two halves and one split, else one half,
    `cta_warps`, `k_splits` and `ring_stages`."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    halves = 2 if glu else 1
    warps = cta_warps(m, n, k, sms, halves)
    splits = 1 if glu else k_splits(m, n, k, sms, warps, halves)
    return halves, warps, splits, ring_stages(n, device, splits, halves)


def qmma_runs(x: torch.Tensor, w: QuantizedTensor, bias: torch.Tensor | None = None,
              pdl: bool | None = None, glu: bool = False) -> bool:
    """Whether `qgemv` takes this kernel for x [M, K] @ w.T: an NVIDIA GPU of compute capability
    >= 8 where the kernel compiles, bf16 x [M, K] on w's device, no bias, `mma_rows`, the planes
    aligned for the kernel's copies, its shared memory within the GPU's, and PDL not demanded
    where the GPU lacks it; glu: the kernel with SiLU*up in its epilogue (two halves, no split)
    for a fused gate/up w."""
    if w.format not in FORMATS or x.device.type != "cuda" or x.dtype != torch.bfloat16:
        return False
    if torch.version.cuda is None:
        return False
    n, k = w.shape
    if bias is not None or x.dim() != 2 or x.shape[1] != k or w.planes["qs"].device != x.device:
        return False
    if not mma_rows(w.format, x.shape[0], n, k) or not planes_aligned(x, w):
        return False
    if torch.cuda.get_device_capability(x.device)[0] < 8:
        return False
    if n % (ROWS * (2 if glu else 1)):
        return False
    halves, warps, splits, stages = launch_shape(x.shape[0], n, k, x.device, glu)
    if shared_bytes(w.format, x.shape[0], warps, stages) > _shared_limit(x.device.index):
        return False
    if pdl and not use_pdl(x, None):
        return False
    name = kernel_name(w.format, x.shape[0], halves, splits > 1, glu, occupancy_for(x.shape[0]))
    return not isinstance(_compiled(x.device.index, name, stages), Exception)


def occupancy_for(m: int) -> int:
    """CTAs of 256 threads an SM the registers are fitted to for x of m rows: 1 (255 registers a
    thread) for the 64-row kernel, whose 64 accumulators a thread spill ~80 words at 128
    registers (Q8_0 ~150; 10 at 255, `bench/sass_stats.py qmma:q4_0:m64_o1:2`), else
    OCCUPANCY."""
    return 1 if m > 32 else OCCUPANCY


def kernel_name(fmt: str, m: int, halves: int | None = None, split: bool = False,
                glu: bool = False, occupancy: int = OCCUPANCY) -> str:
    """The kernel for m rows of x in `fmt`: x in all of B's columns for one, 8 rows a B tile
    above; `halves` 2 (_h2): CTAs of 64 rows (default 1); split (_s): split-K; glu: the one with
    SiLU*up in its epilogue (`qmma_matmul(glu=True)`, two halves, no split); occupancy (_oN
    where not OCCUPANCY): the CTAs of 256 threads an SM that ptxas fits its registers to."""
    if fmt not in FORMATS:
        raise ValueError(f"the tensor-core kernel multiplies {', '.join(FORMATS)} weights, "
                         f"not {fmt}")
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"the tensor-core kernel takes 1..{MAX_ROWS} rows of x, not {m}")
    halves = (2 if glu else 1) if halves is None else halves
    if halves not in (1, 2) or (glu and (halves != 2 or split)):
        raise ValueError(f"a kernel has 1 or 2 halves, the glu kernel 2 and no split: got "
                         f"halves {halves}, split {split}, glu {glu}")
    if f"o{occupancy}" not in OCCUPANCY_FLAGS and occupancy != OCCUPANCY:
        raise ValueError(f"occupancy must be one of {OCCUPANCY}, "
                         f"{', '.join(f[1:] for f in OCCUPANCY_FLAGS)}, got {occupancy}")
    flags = "_glu" if glu else ("_h2" if halves == 2 else "") + ("_s" if split else "")
    flags += "" if occupancy == OCCUPANCY else f"_o{occupancy}"
    return f"{fmt}_mma_m{1 if m == 1 else max(8, 1 << (m - 1).bit_length())}" + flags


def _kernel_planes(w: QuantizedTensor) -> tuple[tuple[torch.Tensor, ...], int, int, int]:
    """The kernel's qh, p1..p4 for `w` (qs where a format has none: never read) and ldh, ld1
    (bytes), ld2 (elements)."""
    p, fmt = w.planes, w.format
    qs = p["qs"]
    qh = p.get("qh", qs)
    ldh = qh.stride(0) if "qh" in p else 0
    if fmt in ("q4_0", "q5_0", "q8_0"):
        return (qh, p["d"], qs, qs, qs), ldh, 2 * p["d"].stride(0), 0
    if fmt == "int8":
        return (qh, qs, qs, p["d"], qs), ldh, 0, p["d"].stride(0)
    if fmt == "int4_g128":
        return (qh, qs, qs, p["d"], p["m"]), ldh, 0, p["d"].stride(0)
    if fmt in ("q4_1", "q5_1"):
        return (qh, p["d"], p["m"], qs, qs), ldh, 2 * p["d"].stride(0), 0
    if fmt == "q6_k":
        return (qh, p["scales"], qs, p["d"], qs), ldh, p["scales"].stride(0), p["d"].stride(0)
    return ((qh, p["scales"], p["mins"], p["d"], p["dmin"]), ldh, p["scales"].stride(0),
            p["d"].stride(0))


def qmma_matmul(x: torch.Tensor, w: QuantizedTensor, pdl: bool | None = None,
                warps: int | None = None, stages: int | None = None,
                splits: int | None = None, halves: int | None = None,
                glu: bool = False, occupancy: int | None = None) -> torch.Tensor:
    """x [M, K] bf16 @ w.dequantize().T for `w` [N, K] in one of FORMATS -> [M, N] bf16, M <= 64
    (the engine calls it where `qmma_runs`, up to 16 rows; `warps` 1..8 a CTA
    (default `cta_warps`), `halves` 1 or 2 of 32 rows a CTA (default 1, the glu launch 2; the warps
    split between them), `stages` >= 2 a warp's ring (default `ring_stages`) and `splits` 1..K / 128
    / (warps / halves) CTAs along K (default `k_splits`; their float32 sums added in split order,
    kernels/splitk.py's counters) and `occupancy` (`kernel_name`'s; default `occupancy_for`) are for
    benchmarks).
    glu: w is a fused gate/up weight [2I, K] (gate rows first) and the result silu(gate) * up
    [M, I], rounded as this product then `silu_mul` would round it (two halves, no split).
    Launched with PDL where `use_pdl`."""
    n, k = w.shape
    m = x.shape[0]
    occupancy = occupancy_for(m) if occupancy is None else occupancy
    if x.dim() == 2:  # a format, rows of x or an occupancy the kernel lacks: refused first
        kernel_name(w.format, m, occupancy=occupancy)
    if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"qmma_matmul wants bf16 x [M, {k}], got {x.dtype} "
                         f"{tuple(x.shape)}")
    if n <= 0 or k <= 0 or n % ROWS or k % 128:
        raise ValueError(f"qmma_matmul needs N > 0, N % {ROWS} == 0, K > 0 and K % 128 == 0, "
                         f"got [{n}, {k}]")
    cuda = x.device.type == "cuda"
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if cuda else 0
    if glu and (halves not in (None, 2) or splits not in (None, 1)):
        raise ValueError(f"glu (SiLU*up in the epilogue) takes two halves and one split, got "
                         f"halves {halves}, splits {splits}")
    if glu:
        halves, splits = 2, 1
    halves = 1 if halves is None else halves
    warps = cta_warps(m, n, k, sms, halves) if warps is None else warps
    if not 1 <= warps <= 8 or (stages is not None and stages < 2):
        raise ValueError(f"warps must be 1..8 and stages >= 2, got {warps} and {stages}")
    if glu and (n % (2 * ROWS) or warps % 2):
        raise ValueError(f"glu needs a fused [2I, K] gate/up weight with I % {ROWS} == 0 and an "
                         f"even number of warps, got N = {n}, {warps} warps")
    if halves not in (1, 2) or warps % halves or n % (ROWS * halves):
        raise ValueError(f"halves must be 1 or 2, dividing the warps ({warps}) and N / {ROWS} "
                         f"(N = {n}), got {halves}")
    most = max(1, k // 128 // (warps // halves))
    if splits is not None and not 1 <= splits <= most:
        raise ValueError(f"splits must be 1..{most} (a quad of K a warp of each split) for K = "
                         f"{k}, {warps} warps and {halves} halves, got {splits}")
    if not planes_aligned(x, w):
        raise ValueError("qmma_matmul needs x, qs and qh 16-byte aligned (rows too), the scales "
                         "aligned to their loads (planes_aligned)")
    if not cuda or w.planes["qs"].device != x.device:
        raise ValueError(f"qmma_matmul runs on one CUDA GPU: x is on {x.device}, the weight "
                         f"on {w.planes['qs'].device}")
    if splits is None:
        splits = k_splits(m, n, k, sms, warps, halves)
    stages = ring_stages(n, x.device, splits, halves) if stages is None else stages
    name = kernel_name(w.format, m, halves, splits > 1, glu, occupancy)
    smem = shared_bytes(w.format, m, warps, stages)
    if smem > _shared_limit(x.device.index):
        raise ValueError(f"qmma_matmul of {w.format} at {m} rows with {warps} warps and "
                         f"{stages} stages needs {smem} bytes of shared memory, more than the "
                         f"{_shared_limit(x.device.index)} this GPU allows")
    kernel = _compiled(x.device.index, name, stages)
    if isinstance(kernel, Exception):
        raise RuntimeError(f"the tensor-core kernel cannot run here: {kernel}")
    qs = w.planes["qs"]
    planes, ldh, ld1, ld2 = _kernel_planes(w)
    y = torch.empty(m, n // 2 if glu else n, dtype=torch.bfloat16, device=x.device)
    args = [ctypes.c_void_p(t.data_ptr()) for t in (x, qs, *planes, y)]
    args += [ctypes.c_int(v) for v in (m, k, qs.stride(0), ldh, ld1, ld2, x.stride(0),
                                       y.stride(0))]
    if splits > 1:  # the partials and the tiles' counters (none read without a split)
        part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
        cnt = tile_counters(x.device, n // (ROWS * halves))
        args += [ctypes.c_void_p(part.data_ptr()), ctypes.c_void_p(cnt.data_ptr())]
    else:
        args += [ctypes.c_void_p(0), ctypes.c_void_p(0)]
    params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
    attr = _LaunchAttribute(_PDL_ATTRIBUTE, b"", (ctypes.c_uint64 * 8)(1))  # allowed = 1
    gdc = use_pdl(x, pdl)
    config = _LaunchConfig((n // (ROWS * halves), splits, 1), (32 * warps, 1, 1), smem,
                           torch.cuda.current_stream(x.device).cuda_stream,
                           ctypes.pointer(attr) if gdc else None, 1 if gdc else 0)
    with torch.cuda.device(x.device):  # the launch runs in the current context: x's GPU's
        err = _libcuda().cuLaunchKernelEx(ctypes.byref(config), kernel.func, params, None)
    if err:
        raise RuntimeError(f"cuLaunchKernelEx of {name} failed with CUresult {err}")
    return y
