"""Registers, spills and instruction counts of the quantized GEMV kernels compiled for sm_90, with
no GPU: the figures behind docs/performance.md's SASS counts (e.g. "Q5_0, Q5_1 and Q5_K in the
one-row kernel").

    python bench/sass_stats.py words:q5_k:8:128 words:q4_k:8:128 tc:q6_k:64:2
    PYTHONPATH=/tmp/t36:. python bench/sass_stats.py words:q5_k:8:128   # another Triton

Each spec is `words:FORMAT:BLOCK_N:BLOCK_G` (the v2 one-row kernel, kernels/qgemv_words.py: one
row of x, codes as 0.5 + q / 256, prefetched, K = 4096) or `dp4a:FORMAT:BLOCK_N:BLOCK_G`
(bench/dp4a_gemv.py's integer kernel, q4_0 / q8_0, 4 warps, K = 4096; `dp4as:q4_0:..`: its
kernel on x's split planes) or
`tc:FORMAT:BLOCK_N:SPLITS[:o]` (the tensor-core kernel, kernels/qgemm_tc.py: 16 rows, 4 warps,
3 stages, K = 4096; o: the kernel before v4, `qgemm_tc(v4=False)`) or
`qmma:FORMAT:ROWS:STAGES` (the CUDA tensor-core kernel, kernels/qmma.cu, ROWS m1, m8 or m16, a
ring of STAGES; compiled by NVRTC as the engine does, or `cols:RB:WARPS[:x][:aN][:s]`,
bench/q4_0_cols.cu's one-row kernel (x: x loaded ahead, aN: N accumulators, s: sums of x by
ALU),
here from the `nvidia-cuda-nvrtc-cu12` wheel: `pip install nvidia-cuda-nvrtc-cu12`). A Triton
kernel is
compiled for sm_90 with PDL by the Triton that Python imports (the GPU machine's is 3.6; a wheel
of that version installed with `pip install --no-deps --target /tmp/t36 triton==3.6.0` and put
first on PYTHONPATH reproduces its SASS), and Triton's bundled `cuobjdump -sass -res-usage`
reads the cubin. Prints one table: registers a thread, local-memory loads / stores (spills),
shared-memory matrix loads (LDSM: layout conversions), barriers, global loads, all instructions,
those of one step of the main loop, and where in that step its global loads (LDG) and its first
`cp.async` (LDGSTS) sit (instruction indices: a load issued late waits near its use). Pointers
and integer arguments but M and N carry the divisibility by 16 that a launch specializes on
(without it the loads compile to single bytes).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import ctypes.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from llm.backends.torch.kernels.qgemv_common import family  # noqa: E402

_QH_BYTES = {"q5_0", "q5_1", "q5_k"}  # `qh` as bytes; Q6_K's as 32-bit words (qgemv_words)


def _compile(spec: str):
    """The compiled kernel of one spec (see the module docstring)."""
    kind, fmt_name, a, b, *flags = spec.split(":")
    if flags not in ([], ["o"]) or (flags and kind != "tc"):
        raise SystemExit(f"unknown flags {flags} in {spec!r} (tc takes o)")
    old = "o" in flags  # tc: the kernel before v4
    fmt, gs = family(fmt_name)
    types = {"x_ptr": "*bf16", "y_ptr": "*bf16", "b_ptr": "*bf16", "xw_ptr": "*i64",
             "qw_ptr": "*i32", "qs_ptr": "*u8", "d_ptr": "*fp16", "m_ptr": "*fp16",
             "sc_ptr": "*u8", "mn_ptr": "*u8", "p_ptr": "*fp32", "cnt_ptr": "*i32"}
    if fmt in (0, 8):  # Q8_0's and int8's codes are signed
        types["qs_ptr"] = "*i8"
    if fmt_name == "int8":  # its scale: float32 a row
        types["d_ptr"] = "*fp32"
    elif fmt_name.startswith("int4_g"):  # bf16 d and m
        types["d_ptr"] = types["m_ptr"] = "*bf16"
    if kind == "words":
        from llm.backends.torch.kernels.qgemv_words_kernel import _qgemv_w_kernel as kernel

        types["qh_ptr"] = "*u8" if fmt_name in _QH_BYTES else "*i32"
        ce = dict(K=4096, FMT=fmt, GS=gs, M=1, BLOCK_N=int(a), BLOCK_G=int(b),
                  MAGIC=fmt not in (0, 8), PREFETCH=True, GLU=False, ROPE=False, N_HEADS=0,
                  N_KV=0, HEAD_DIM=2, XF16=False, HAS_BIAS=False, COMPILED=True, STAGES=1,
                  TILES=1, USE_GDC=True, NORM=False, NORM_N=1, NBLOCK=1)
        options = {"num_warps": 4, "launch_pdl": True}
    elif kind == "tc":
        from llm.backends.torch.kernels.qgemm_tc import _qgemm_tc_kernel as kernel
        from llm.backends.torch.kernels.qgemm_tc import q5_permutes

        types["qh_ptr"] = "*u8"
        splits = int(b)
        ce = dict(K=4096, FMT=fmt, GS=gs, BLOCK_M=16, BLOCK_N=int(a), SPLITS=splits,
                  SPLIT_G=128 // splits, FAST=True, V4=not old,
                  Q5P=q5_permutes(int(a), 4, True, not old), HAS_BIAS=False, COMPILED=True,
                  USE_GDC=True)
        options = {"num_warps": 4, "num_stages": 3, "launch_pdl": True}
    elif kind in ("dp4a", "dp4as"):
        import importlib.util  # by path: importing `bench` would pick Triton's interpreter

        at = importlib.util.spec_from_file_location("dp4a_gemv", Path(__file__).with_name(
            "dp4a_gemv.py"))
        mod = importlib.util.module_from_spec(at)
        at.loader.exec_module(mod)
        types.update(pw_ptr="*i32", s_ptr="*fp32", sum_ptr="*i32", xw_ptr="*i32",
                     meta_ptr="*i32")
        ce = dict(K=4096, BLOCK_N=int(a), BLOCK_G=int(b), COMPILED=True, USE_GDC=True)
        if kind == "dp4a":
            kernel = mod._dp4a_gemv_kernel
            ce["FMT"] = mod.FORMATS[fmt_name]
        else:  # x's split planes, Q4_0 only
            kernel = mod._dp4a_gemv_split_kernel
        options = {"num_warps": 4, "launch_pdl": True}
    else:
        raise SystemExit(f"unknown kernel {kind!r} in {spec!r} (words, tc, dp4a or qmma)")
    signature = {arg: "constexpr" if arg in ce else types.get(
        arg, "*bf16" if arg.endswith(("_ptr", "_pool")) else "i32") for arg in kernel.arg_names}
    # what a launch specializes: pointers and integers that are multiples of 16 (all but the
    # rows of x and the output features here) are known to be so, which vectorizes the loads
    hints = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(kernel.arg_names)
             if arg not in ce and arg not in ("M", "N")}
    return triton.compile(ASTSource(kernel, signature, ce, hints),
                          target=GPUTarget("cuda", 90, 32), options=options)


def _nvrtc() -> ctypes.CDLL:
    """NVRTC from the nvidia-cuda-nvrtc-cu12 wheel, else the system's."""
    try:
        import nvidia.cuda_nvrtc as pkg  # the wheel's namespace package

        libs = sorted(Path(list(pkg.__path__)[0], "lib").glob("libnvrtc.so*"))
        return ctypes.CDLL(str(libs[0]))
    except (ImportError, IndexError, OSError):
        name = ctypes.util.find_library("nvrtc")
        if name is None:
            raise SystemExit("qmma specs need NVRTC: pip install nvidia-cuda-nvrtc-cu12") from None
        return ctypes.CDLL(name)


def _qmma_cubin(spec: str) -> bytes:
    """The cubin of one qmma spec, FORMAT:ROWS:STAGES, compiled for sm_90 by NVRTC from
    kernels/qmma.cu as `qmma._compiled` compiles it; or of one cols spec, RB:WARPS
    (bench/q4_0_cols.cu)."""
    if spec.startswith("cols:"):
        from bench import q4_cols_explore

        _, rb, warps, *flags = spec.split(":")
        na = next((int(f[1:]) for f in flags if f.startswith("a")), 1)
        src = q4_cols_explore.kernel_source(int(rb), int(warps), "x" in flags,
                                            na=na, sa="s" in flags).encode()
    else:
        from llm.backends.torch.kernels import qmma

        _, fmt_name, rows, stages = spec.split(":")
        src = qmma.kernel_source(f"{fmt_name}_mma_{rows}", int(stages)).encode()
    lib, prog = _nvrtc(), ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"qmma.cu", 0, None, None):
        raise SystemExit(f"NVRTC could not create a program for {spec!r}")
    opts = (ctypes.c_char_p * 2)(b"--gpu-architecture=sm_90", b"-std=c++17")
    if lib.nvrtcCompileProgram(prog, 2, opts):
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        raise SystemExit(f"NVRTC failed on {spec!r}: {log.value.decode()[:2000]}")
    size = ctypes.c_size_t()
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
    cubin = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetCUBIN(prog, cubin)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return cubin.raw


def loop_span(sass: str) -> tuple[int, int]:
    """(first, last) addresses of the kernel's main loop in the SASS: the longest backward
    conditional branch's span, among those holding an MMA where any does (an epilogue's loop
    can be longer than the tensor-core kernel's main loop); (0, -16) where there is none."""
    at = re.compile(r"/\*([0-9a-f]{4,})\*/")
    mmas = [int(m.group(1), 16) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+\S*MMA", sass)]
    spans = []
    for line in sass.splitlines():
        m = re.search(r"@!?U?P\w+\s+BRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", line)
        here = at.search(line)
        if m and m.group(1) and here:
            start, end = int(m.group(1), 16), int(here.group(1), 16)
            if start < end:
                spans.append((start, end))
    with_mma = [sp for sp in spans if any(sp[0] <= a <= sp[1] for a in mmas)]
    return max(with_mma or spans, key=lambda sp: sp[1] - sp[0], default=(0, -16))


def loop_instructions(sass: str) -> int:
    """Instructions of one step of the kernel's main loop (`loop_span`)."""
    start, end = loop_span(sass)
    return (end - start) // 16 + 1


def loop_loads(sass: str) -> tuple[list[int], int | None]:
    """Where in one step of the main loop its global loads (LDG, not LDGSTS) sit, and its first
    `cp.async` (LDGSTS): instruction indices from the step's start."""
    start, end = loop_span(sass)
    ldg, first_copy = [], None
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?(LDGSTS|LDG)\b", sass):
        here = int(m.group(1), 16)
        if start <= here <= end:
            if m.group(2) == "LDG":
                ldg.append((here - start) // 16)
            elif first_copy is None:
                first_copy = (here - start) // 16
    return ldg, first_copy


def loop_mix(sass: str) -> collections.Counter:
    """Opcodes (without their modifiers) of one step of the main loop (`loop_span`)."""
    start, end = loop_span(sass)
    return collections.Counter(
        m.group(3).split(".")[0] for m in re.finditer(
            r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
        if start <= int(m.group(1), 16) <= end)


def _sass(spec: str) -> str:
    """cuobjdump -sass -res-usage of one spec's cubin."""
    cuda_c = spec.startswith(("qmma:", "cols:"))
    cubin = _qmma_cubin(spec) if cuda_c else _compile(spec).asm["cubin"]
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([str(tool), "-sass", "-res-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def sass_stats(spec: str, out: str) -> list:
    """[spec, registers, LDL, STL, LDSM, BAR, LDG, instructions, loop step, the loop's LDG
    indices, its first LDGSTS] of one spec, from its SASS `out`."""
    ops = collections.Counter(m.group(2).split(".")[0] for m in re.finditer(
        r"\s+/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", out))
    regs = re.search(r"REG:(\d+)", out)
    ldg, first_copy = loop_loads(out)
    return [spec, regs.group(1) if regs else "?", ops["LDL"], ops["STL"], ops["LDSM"],
            ops["BAR"], ops["LDG"], sum(ops.values()), loop_instructions(out),
            ", ".join(map(str, ldg)) or "-", "-" if first_copy is None else first_copy]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("specs", nargs="+", help="words:FORMAT:BLOCK_N:BLOCK_G, dp4a:FORMAT:BLOCK_N:"
                                            "BLOCK_G, "
                                            "tc:FORMAT:BLOCK_N:SPLITS, qmma:FORMAT:ROWS:STAGES "
                                            "or cols:RB:WARPS[:x][:aN][:s]")
    p.add_argument("--mix", type=int, default=0, metavar="N",
                   help="also print the N most frequent opcodes of one main-loop step per spec")
    args = p.parse_args(argv)
    sass = {s: _sass(s) for s in args.specs}
    rows = [sass_stats(s, out) for s, out in sass.items()]
    print(f"Triton {triton.__version__}, sm_90")
    print("| kernel | registers | LDL | STL | LDSM | BAR | LDG | instructions | a loop step | "
          "the step's LDG at | its first LDGSTS at |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(v) for v in r) + " |")
    for spec, out in sass.items() if args.mix else ():
        mix = loop_mix(out)
        print(f"{spec}: a loop step's {sum(mix.values())} instructions: "
              + ", ".join(f"{op} {n}" for op, n in mix.most_common(args.mix)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
