"""The tokenizer's error type (shared by the tokenizer and the GGUF vocabulary reader)."""

from __future__ import annotations


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded or used; the message names the path when there is one."""
