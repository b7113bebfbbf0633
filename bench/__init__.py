"""Scripts that reproduce the figures of docs/performance.md (see bench/README.md).

Without a CUDA device the Triton kernels run in Triton's interpreter, as in tests/conftest.py: the
interpreter is chosen when a kernel module is imported, so it is set here, before any script
imports one (so scripts import triton only through llm's kernel modules, after bench). That is
what lets `--smoke` check a script on a CPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
