"""`LLM`: the one-object API for applications (load a model, generate, stream, chat)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from llm.backends.base import create_backend
from llm.checkpoint import default_cache_dir, default_model_path, load_checkpoint
from llm.config import ConfigError, RuntimeConfig
from llm.generator import Generator, RequestOutput, StreamEvent
from llm.sampling import SamplingParams
from llm.tokenizer import Tokenizer

DEFAULT_MAX_SEQ_LEN = 2048


class LLM:
    """A loaded model ready to generate.

    model: a Hugging Face directory, a .gguf file, or None for the embedded SmolLM2-135M-Instruct.
    max_seq_len: longest prompt + completion per request (default: the model's context, at most
    2048). max_batch: users decoded together. num_blocks: KV pages in the pool (default: every slot
    at max_seq_len). backend_options: keyword arguments for the backend's `create` (its runner).
    """

    def __init__(self, model: str | Path | None = None, *, backend: str = "torch",
                 device: str = "cpu", dtype: str = "float32", max_batch: int = 8,
                 max_seq_len: int | None = None, block_size: int = 32,
                 num_blocks: int | None = None,
                 cache_dir: str | Path | None = None, progress: bool = True,
                 backend_options: Mapping[str, Any] | None = None) -> None:
        path = Path(model) if model is not None else default_model_path()
        self.checkpoint = load_checkpoint(path, cache_dir=cache_dir, progress=progress)
        self.config = self.checkpoint.config
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.tokenizer = Tokenizer.from_path(path, cache_dir=cache,
                                             digest=self.checkpoint.source_sha256)
        limit = self.config.max_context
        if max_seq_len is None:
            max_seq_len = min(limit, DEFAULT_MAX_SEQ_LEN)
        elif max_seq_len > limit:
            raise ConfigError(
                f"max_seq_len={max_seq_len} exceeds the model's context of {limit} tokens")
        self.runtime = RuntimeConfig(device=device, dtype=dtype, max_batch=max_batch,
                                     max_seq_len=max_seq_len, block_size=block_size,
                                     num_blocks=num_blocks)
        self.backend = create_backend(backend, self.checkpoint, self.runtime, backend_options)
        self.generator = Generator(self.backend, self.tokenizer)

    def generate(self, prompts: str | Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, chat: bool = False) -> list[RequestOutput]:
        """Complete each prompt (text or token ids); with chat=True each is one user message."""
        return self.generator.generate(_as_list(prompts), params, chat)

    def stream(self, prompts: str | Sequence[str | Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams] | None = None,
               *, chat: bool = False) -> Iterator[StreamEvent]:
        """Like generate, yielding text deltas as they are produced."""
        return self.generator.stream(_as_list(prompts), params, chat)

    def chat(self, messages: list[dict[str, str]],
             params: SamplingParams | None = None) -> RequestOutput:
        """Answer one conversation (list of {"role", "content"}) rendered by the model's chat
        template.
        """
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return self.generator.generate([ids], params)[0]


def _as_list(prompts: str | Sequence[str | Sequence[int]]) -> list[str | Sequence[int]]:
    if isinstance(prompts, str):
        return [prompts]
    if prompts and isinstance(prompts[0], int):  # one prompt given as token ids
        return [prompts]  # type: ignore[list-item]
    return list(prompts)
