"""The CPU kernels of cpu_kernels.c, compiled on first use and loaded with ctypes.

The shared library is built with the machine's C compiler ($CC, else `cc`) for this CPU
(-O3 -march=native -fopenmp) into `<weights cache>/kernels/`, named by a hash of the source, the
flags, the compiler's version and the CPU's feature flags, so a changed source, compiler or
machine builds a new one; the build writes a temporary file and renames it, so an interrupted
build leaves nothing half-written. It links the OpenMP runtime torch has already loaded
(`libgomp.so.1`), so its threads are torch's (`torch.set_num_threads` sets their number).

Without a working compiler `load_kernels` raises `NativeKernelsUnavailable`, whose message says
why (the compiler's own error); the caller falls back to torch ops.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11")
BUILD_TIMEOUT_S = 120


class NativeKernelsUnavailable(RuntimeError):
    """The C kernels could not be built or loaded (no compiler, a failed build)."""


class _QMat(ctypes.Structure):  # cpu_kernels.c `qmat`
    _fields_ = [("codes", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("zero", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("n", ctypes.c_int64),
                ("k", ctypes.c_int64), ("bits", ctypes.c_int32), ("f16", ctypes.c_int32),
                ("next", ctypes.c_void_p)]


class _Layer(ctypes.Structure):  # cpu_kernels.c `layer_t`
    _fields_ = [("qkv", _QMat), ("o", _QMat), ("gate_up", _QMat), ("down", _QMat),
                ("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float),
                ("kpool", ctypes.c_void_p), ("vpool", ctypes.c_void_p), ("nh", ctypes.c_int64),
                ("nkv", ctypes.c_int64), ("hd", ctypes.c_int64), ("bs", ctypes.c_int64)]


def _blocks(w) -> list:
    """A projection's layers as `layer_plan` takes them: one, or its row blocks' list."""
    return w if isinstance(w, list) else [w]


@dataclass(frozen=True)
class LayerPlan:
    """One decoder layer as `layer_decode` takes it: the C struct of pointers, and the tensors
    they point into (kept alive here). Built once per layer (`NativeKernels.layer_plan`)."""

    struct: _Layer
    tensors: tuple
    kpool: torch.Tensor
    vpool: torch.Tensor


@dataclass(frozen=True)
class NativeKernels:
    """The loaded library; every function takes raw pointers of contiguous tensors."""

    path: Path
    lib: ctypes.CDLL
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # see `scratch`

    def scratch(self, name: str, numel: int) -> torch.Tensor:
        """A float32 buffer `name` of at least `numel` values, reused from call to call (a
        prompt's layers are dequantized one after another into "dequant"; a fresh tensor per call
        would fault its pages in anew each time: 1.5 ms instead of ~0.3 ms for a [3072, 576]
        layer). One engine drives a backend at a time, so a buffer has one user at a time."""
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = self.buffers[name] = torch.empty(numel)
        return buf[:numel]

    def layer_plan(self, qkv, o, gate_up, down, biases: tuple, attn_norm: torch.Tensor,
                   mlp_norm: torch.Tensor, eps: float, kpool: torch.Tensor, vpool: torch.Tensor,
                   n_heads: int) -> LayerPlan:
        """The struct `layer_decode` reads for one layer: its four projections (native
        `CpuQuantLinear`s, cpu.py, or for a projection whose row blocks are stored in different
        formats the list of its blocks' layers) with their biases (tensors or None), its norms,
        its K/V pools [blocks, n_kv, bs, hd]."""
        chained: list = []  # the blocks after a projection's first, which its struct points to

        def mat(w, bias) -> _QMat:
            blocks = _blocks(w)
            starts = list(accumulate((b.out_features for b in blocks), initial=0))
            after = None
            for b, lo, hi in reversed(list(zip(blocks, starts[:-1], starts[1:], strict=True))):
                m = _QMat(b.weight.data_ptr(), b.scales.data_ptr(), b.zero.data_ptr(),
                          None if bias is None else bias[lo:hi].data_ptr(), b.out_features,
                          b.in_features, b.bits, int(b.scales.dtype == torch.float16),
                          None if after is None else ctypes.addressof(after))
                if after is not None:
                    chained.append(after)
                after = m
            return after

        _, n_kv, bs, hd = kpool.shape
        struct = _Layer(mat(qkv, biases[0]), mat(o, biases[1]), mat(gate_up, biases[2]),
                        mat(down, biases[3]), attn_norm.data_ptr(), mlp_norm.data_ptr(), eps,
                        hd ** -0.5, kpool.data_ptr(), vpool.data_ptr(), n_heads, n_kv, hd, bs)
        return LayerPlan(struct, (qkv, o, gate_up, down, biases, attn_norm, mlp_norm, chained),
                         kpool, vpool)

    def decode_layers(self, plans: list[LayerPlan], x: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, page_table: torch.Tensor, positions: torch.Tensor,
                      max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's decode step, one C call each (`layer_decode`: the per-op path's
        functions in its order, so the same bits): x [B, H] embeddings -> (last MLP output,
        residual stream) [B, H]. page_table [B, nb] int64 contiguous, positions [B] int64."""
        b, h = x.shape
        first = plans[0].tensors
        width = sum(w.out_features for w in _blocks(first[0]))  # q + 2 kv: more than q
        inter = _blocks(first[3])[0].in_features
        n_heads = plans[0].struct.nh
        scratch = self.scratch("layer", b * (2 * h + 2 * width + 3 * inter
                                             + max(width, 2 * inter)))
        hd = plans[0].struct.hd
        scores = self.scratch("scores", self.lib.attention_scratch(b, n_heads, hd, max_pos + 1))
        residual, out = torch.empty(b, h), [torch.empty(b, h), torch.empty(b, h)]
        fn, args = self.lib.layer_decode, (
            cos.data_ptr(), sin.data_ptr(), page_table.data_ptr(), page_table.shape[1],
            positions.data_ptr(), max_pos, scores.data_ptr(), scratch.data_ptr())
        for i, plan in enumerate(plans):
            y = out[i % 2]
            fn(ctypes.byref(plan.struct), b, x.data_ptr(), residual.data_ptr(), int(i > 0), *args,
               y.data_ptr())
            x = y
        return x, residual

    def matmul(self, bits: int, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
               zero: torch.Tensor, n: int) -> torch.Tensor:
        """x float32 [M, K] @ W^T -> float32 [M, n] for W in the q4 (bits 4), q6 or q8 layout,
        scale and zero both float32 or both float16."""
        m, k = x.shape
        y = torch.empty(m, n, dtype=torch.float32)
        self._fn("matmul", bits, scale)(x.data_ptr(), m, k, codes.data_ptr(), scale.data_ptr(),
                                        zero.data_ptr(), n, y.data_ptr())
        return y

    def dequant(self, bits: int, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                n: int, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """W in the q4 / q6 / q8 layout -> float32 [n, k] (into `out`, contiguous, when given)."""
        if out is None:
            out = torch.empty(n, k, dtype=torch.float32)
        self._fn("dequant", bits, scale)(codes.data_ptr(), scale.data_ptr(), zero.data_ptr(), n,
                                         k, out.data_ptr())
        return out

    def _fn(self, op: str, bits: int, scale: torch.Tensor):
        """The C function of `op` for the code layout (bits 4, 6 or 8) and scale dtype."""
        suffix = {torch.float32: "", torch.float16: "_f16"}.get(scale.dtype)
        if suffix is None:
            raise TypeError(f"the C kernels take float32 or float16 scales, got {scale.dtype}")
        return getattr(self.lib, f"q{bits}_{op}{suffix}")

    def take(self, bits: int, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
             ids: torch.Tensor, k: int) -> torch.Tensor:
        """Rows `ids` (int64 [n], in range) of W in the q4 / q6 / q8 layout -> float32 [n, k]."""
        ids = ids.contiguous()
        out = torch.empty(ids.shape[0], k)
        self._fn("take", bits, scale)(codes.data_ptr(), scale.data_ptr(), zero.data_ptr(),
                                      ids.data_ptr(), ids.shape[0], k, out.data_ptr())
        return out

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(x + residual) * weight, x + residual) for float32 x, residual [M, H]."""
        m, h = x.shape
        total, out = torch.empty(m, h), torch.empty(m, h)
        self.lib.add_rms_norm(x.data_ptr(), None if residual is None else residual.data_ptr(),
                              weight.data_ptr(), eps, m, h, total.data_ptr(), out.data_ptr())
        return out, total

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up float32 [M, 2I] -> silu(gate) * up [M, I]."""
        m, i2 = gate_up.shape
        out = torch.empty(m, i2 // 2)
        self.lib.silu_mul(gate_up.data_ptr(), m, i2 // 2, out.data_ptr())
        return out

    def attention_decode(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         k_pool: torch.Tensor, v_pool: torch.Tensor, page_table: torch.Tensor,
                         positions: torch.Tensor, n_heads: int, max_pos: int,
                         scale: float) -> torch.Tensor:
        """One decode step of attention (cpu_kernels.c `attention_decode`): qkv float32
        [B, (nh + 2 n_kv) hd] (q and k rotated in place), K/V written into the pools
        [blocks, n_kv, bs, hd] at each user's position -> [B, nh * hd]."""
        b = qkv.shape[0]
        _, n_kv, bs, hd = k_pool.shape
        scores = torch.empty(self.lib.attention_scratch(b, n_heads, hd, max_pos + 1))
        out = torch.empty(b, n_heads * hd)
        self.lib.attention_decode(
            qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(),
            page_table.data_ptr(), positions.data_ptr(), b, n_heads, n_kv, hd, bs,
            page_table.shape[1], scale, scores.data_ptr(), max_pos + 1, out.data_ptr())
        return out


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise NativeKernelsUnavailable("no C compiler found (set CC or install gcc)")
    return cc


def _fingerprint(cc: str, flags: tuple[str, ...]) -> str:
    """Hash of what the built library depends on: source, flags, compiler, CPU features."""
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeKernelsUnavailable(f"C compiler {cc!r} does not run: {e}") from e
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(flags).encode(), version.encode(), cpu.encode()):
        h.update(part)
    return h.hexdigest()[:16]


def _build(cc: str, flags: tuple[str, ...], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem + ".", suffix=".tmp")
    os.close(fd)
    try:
        try:
            done = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True,
                                  text=True, timeout=BUILD_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as e:
            raise NativeKernelsUnavailable(f"building {SOURCE.name} with {cc} failed: {e}") from e
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise NativeKernelsUnavailable(
                f"building {SOURCE.name} with {cc} failed (exit {done.returncode}): "
                + " | ".join(tail))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _drop_stale_builds(folder: Path) -> None:
    """Remove temporary files of builds that were killed (older than a build can take)."""
    for tmp in folder.glob("cpu_kernels-*.tmp"):
        with contextlib.suppress(OSError):
            if time.time() - tmp.stat().st_mtime > 2 * BUILD_TIMEOUT_S:
                tmp.unlink()


def load_kernels(cache_dir: Path, flags: tuple[str, ...] = FLAGS,
                 progress: bool = False) -> NativeKernels:
    """Build (once per source, flags, compiler and CPU) and load the kernels from
    `cache_dir`/kernels. `flags`: the compiler's (tests build the portable path with an -march
    without AVX-512). progress: say on stderr when a build runs (~2 s) and how long it took.
    Where that folder cannot be written (a read-only cache), the build goes to a temporary
    folder for this process, with a warning."""
    cc = _compiler()
    target = Path(cache_dir) / "kernels" / f"cpu_kernels-{_fingerprint(cc, flags)}.so"
    scratch = None
    if not target.is_file():
        if progress:
            print(f"building the CPU kernels for this machine with {cc} (once) ...", end="",
                  file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            _drop_stale_builds(target.parent)
            _build(cc, flags, target)  # (makes the folder)
        except OSError as e:  # the cache cannot be written: build for this process only
            warnings.warn(f"cannot write the CPU kernels to {target.parent} ({e.strerror or e}); "
                          "building them in a temporary folder for this run", RuntimeWarning,
                          stacklevel=2)
            try:
                scratch = tempfile.mkdtemp(prefix="llm-kernels-")
            except OSError as e2:
                raise NativeKernelsUnavailable(f"no writable folder for the CPU kernels: {e2}"
                                               ) from e2
            target = Path(scratch) / target.name
            _build(cc, flags, target)
        if progress:
            where = "for this run only" if scratch is not None else f"-> {target}"
            print(f" {time.perf_counter() - start:.1f} s {where}", file=sys.stderr)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        raise NativeKernelsUnavailable(f"loading {target} failed: {e}") from e
    finally:
        if scratch is not None:  # the loaded library stays mapped
            shutil.rmtree(scratch, ignore_errors=True)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    f32 = ctypes.c_float
    signatures = {
        **{f"q{b}_{op}{t}": args for b in (4, 6, 8) for t in ("", "_f16") for op, args in (
            ("matmul", [ptr, i64, i64, ptr, ptr, ptr, i64, ptr]),
            ("dequant", [ptr, ptr, ptr, i64, i64, ptr]),
            ("take", [ptr, ptr, ptr, ptr, i64, i64, ptr]))},
        "add_rms_norm": [ptr, ptr, ptr, f32, i64, i64, ptr, ptr],
        "silu_mul": [ptr, i64, i64, ptr],
        "attention_decode": [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64,
                             f32, ptr, i64, ptr],
        "attention_scratch": [i64, i64, i64, i64],
        "layer_decode": [ptr, i64, ptr, ptr, ctypes.c_int, ptr, ptr, ptr, i64, ptr, i64, ptr, ptr,
                         ptr],
    }
    for name, args in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = i64 if name == "attention_scratch" else None
    return NativeKernels(target, lib)
