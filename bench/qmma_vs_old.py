"""The tensor-core kernel (kernels/qmma.py) against an earlier version of it, in one process.

The earlier version is a directory holding that version's Python module and CUDA source, written
from git on a machine with the history, e.g. the 4-bit kernel of dc5be81 that qmma replaced:

    mkdir -p /tmp/oldk && for f in q4_mma.py q4_mma.cu; do
      git show dc5be81:llm/backends/torch/kernels/$f > /tmp/oldk/$f; done
    python bench/qmma_vs_old.py --old /tmp/oldk --module q4_mma --formats q4_0,q4_k

Against main's kernel of the same launch (one split, 32-row CTAs: the cost of the split-K and
halves code itself), shapes and then decode steps alternated:

    mkdir -p /tmp/mainq && for f in qmma.py qmma.cu; do
      git show main:llm/backends/torch/kernels/$f > /tmp/mainq/$f; done
    python bench/qmma_vs_old.py --old /tmp/mainq --module qmma --formats q4_0 --plain --decode

Per format: each linear shape of the configs at --batches rows of x (default 2, 4 and 8), both
kernels timed as CUDA graphs over copies of the weight larger than the L2 (and whether their bits
agree); then, with --decode, whole decode steps (`bench/quant_decode.py`, 8B, the same batches)
with `qgemv` routed to the old kernel and to the new one, alternated --repeats times.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench  # noqa: E402, F401
from bench import quant_decode  # noqa: E402
from bench.common import SHAPES, csv, graph_us, l2_bytes  # noqa: E402
from bench.quant_decode import linear_shapes, random_quantized, weight_copies  # noqa: E402
from llm.backends.torch.kernels import qgemv, qmma  # noqa: E402


def load_old(directory: str, module: str):
    """The old version's module, imported from `directory`: its `<module>_runs` and
    `<module>_matmul` are the routing test and the launch (as qmma's `qmma_runs` and
    `qmma_matmul`)."""
    sys.path.insert(0, directory)
    mod = importlib.import_module(module)
    return getattr(mod, f"{module}_runs"), getattr(mod, f"{module}_matmul")


def new_matmul(args):
    """The current kernel's launch: its rules, or with --plain one split along K and CTAs of 32
    rows (the launch of the kernels before split-K and halves: their code's own cost)."""
    return functools.partial(qmma.qmma_matmul, splits=1, halves=1) if args.plain else \
        qmma.qmma_matmul


def kernels(args, old_mm) -> None:
    """Both kernels per shape and rows of x."""
    new_mm = new_matmul(args)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    for fmt in csv(args.formats):
        for cfg in csv(args.configs):
            for lin, (n, k) in linear_shapes(SHAPES[cfg]).items():
                if lin == "head_chunk":
                    continue
                w0 = random_quantized(fmt, n, k, g, dev)
                ws = weight_copies(w0, l2_bytes(dev))
                for m in csv(args.batches, int):
                    x = (torch.randn(m, k, device=dev, generator=g) * 0.5).to(torch.bfloat16)
                    same = torch.equal(old_mm(x, w0), new_mm(x, w0))
                    t_old = graph_us([lambda w=w, x=x: old_mm(x, w) for w in ws], dev)
                    t_new = graph_us([lambda w=w, x=x: new_mm(x, w) for w in ws], dev)
                    print(f"{fmt} {cfg} {lin:8s} rows {m}: old {t_old:7.1f} us, new {t_new:7.1f} "
                          f"us, new / old {t_new / t_old:.3f}, same bits {same}", flush=True)
                del ws


def decode(args, old_runs, old_mm) -> None:
    """Decode steps with `qgemv` routed to each kernel, alternated (the old one without the
    SiLU*up epilogue it may lack, `qmma.glu_epilogue` False, unless --old-glu; --plain: the new
    one without it too)."""
    new = qgemv.qmma_runs, qgemv.qmma_matmul, qmma.glu_epilogue
    old_glu = qmma.glu_epilogue if args.old_glu else (lambda *a: False)
    for _ in range(args.repeats):
        for label, (runs, mm, glu) in (
                ("old", (old_runs, old_mm, old_glu)),
                ("new", (qgemv.qmma_runs, new_matmul(args),
                         (lambda *a: False) if args.plain else qmma.glu_epilogue))):
            qgemv.qmma_runs, qgemv.qmma_matmul, qmma.glu_epilogue = runs, mm, glu
            print(f"decode through the {label} kernel", flush=True)
            try:
                quant_decode.main(["--configs", "8b", "--formats", args.formats,
                                   "--batches", args.batches])
            finally:
                qgemv.qmma_runs, qgemv.qmma_matmul, qmma.glu_epilogue = new


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, help="directory of the old module and its .cu")
    p.add_argument("--module", default="q4_mma", help="the old module's name")
    p.add_argument("--formats", default="q4_0,q4_k", help="formats both kernels take")
    p.add_argument("--configs", default="8b,1b")
    p.add_argument("--batches", default="2,4,8", help="comma list of rows of x (1..16)")
    p.add_argument("--decode", action="store_true", help="also whole decode steps (8B)")
    p.add_argument("--repeats", type=int, default=2, help="--decode: old / new alternations")
    p.add_argument("--plain", action="store_true",
                   help="the new kernel with one split and CTAs of 32 rows (splits=1, halves=1)")
    p.add_argument("--old-glu", action="store_true",
                   help="--decode: the old kernel with the SiLU*up epilogue too (where it has "
                        "one: qmma since 2026-12-06), as the engine launches it")
    p.add_argument("--no-shapes", action="store_true", help="--decode only, no per-shape table")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("both kernels need a CUDA GPU")
    old_runs, old_mm = load_old(args.old, args.module)
    if not args.no_shapes:
        kernels(args, old_mm)
    if args.decode:
        decode(args, old_runs, old_mm)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
