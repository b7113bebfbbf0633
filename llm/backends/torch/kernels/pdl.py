"""Programmatic dependent launch (PDL) for the decode kernels, on Hopper and newer GPUs.

A kernel launched with PDL may start while the kernel before it in the stream is still running:
its programs do what does not depend on that kernel (address arithmetic, loading weights), then
wait in `griddepcontrol.wait` until it has finished and its writes are visible. Each of our
kernels also lets its own successor start as soon as all of its programs are running
(`griddepcontrol.launch_dependents`), so in a decode step the launch latency and the ramp-up of
one kernel overlap the tail of the previous one. The rule every kernel keeps: no global read of
another kernel's output and no global write before the wait. CUDA graphs keep the launch
attribute as a programmatic edge. A kernel launched without PDL (the torch ops in between) simply
waits as usual, so PDL and plain kernels mix safely.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.lru_cache(maxsize=8)
def _supported(device: torch.device) -> bool:
    """An NVIDIA GPU of compute capability >= 9, kernels compiled (not Triton's interpreter, where
    griddepcontrol does not exist) by a Triton that knows launch_pdl."""
    if device.type != "cuda" or torch.version.cuda is None or os.environ.get("TRITON_INTERPRET"):
        return False
    if torch.cuda.get_device_capability(device)[0] < 9:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


def use_pdl(t: torch.Tensor, pdl: bool | None = None) -> bool:
    """Whether to launch a kernel on t's device with PDL: `pdl` if given (True is refused where
    the GPU or Triton lacks it), else wherever supported (compute capability >= 9)."""
    ok = _supported(t.device)
    if pdl and not ok:
        raise ValueError(f"programmatic dependent launch needs a CUDA GPU of compute capability "
                         f">= 9 and a Triton with launch_pdl; {t.device} has not")
    return ok if pdl is None else pdl


def launch_options(use: bool) -> dict[str, bool]:
    """Extra launch keywords for a Triton kernel: launch_pdl where PDL is used, else none."""
    return {"launch_pdl": True} if use else {}


@triton.jit
def wait_then_release(USE_GDC: tl.constexpr):
    """Call before a kernel's first read of another kernel's output (or any global write): wait
    for the previous kernel, then allow the next one to launch."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
