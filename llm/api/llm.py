"""`LLM`: the one-object API for applications (load a model, generate, stream, chat)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from llm.engine.contract.backend import BackendSpec, Capabilities, create_backend
from llm.engine.contract.sampling_params import SamplingParams
from llm.engine.core import EngineCore
from llm.engine.generator import Generator, RequestOutput, StreamEvent
from llm.engine.scheduler import SchedulerConfig
from llm.model.paths import default_cache_dir
from llm.model.tokenizer.tokenizer import Tokenizer


class LLM:
    """A loaded model ready to generate.

    model: a Hugging Face directory, a .gguf file, or None for the embedded SmolLM2-135M-Instruct.
    max_seq_len: longest prompt + completion per request (default: the model's context, at most
    2048). max_batch: users decoded together. num_blocks: KV pages in the pool (default: every slot
    at max_seq_len). backend_options: the backend's own options (see its `create`).
    weights: "auto" (default: the backend's choice; torch: "stored" on the CPU, "dequantize" on
    CUDA and for tensor parallel; tt: "dequantize"), "dequantize" (every weight in floating
    point), "stored" (a GGUF's quantized blocks kept as stored: its cache entry is about the
    GGUF's size; CUDA decode runs them through a Triton GEMV; the CPU in float32 through the C
    kernels of llm/backends/torch/quant/cpu_kernels.c, in bfloat16 through torch's int4/int8
    kernels (Q6_K as a dense copy)), "int8" / "int4" / "int4_mix" (a Hugging Face
    checkpoint's matrices quantized at load; "int4_mix" keeps v_proj and down_proj in int8).
    int4_group: with "int4" / "int4_mix", the columns of every int4 group (a multiple of 32
    dividing each matrix's in_features; None: 128, or 64 / 32 where 128 does not divide it).
    prefix_cache: reuse the KV pages of prompt prefixes that earlier requests computed (a shared
    system prompt, the earlier turns of a chat); outputs are bit-identical with and without it
    (see llm.engine.prefix_cache); `SamplingParams(cache_salt=...)` keeps a request's cached
    pages apart from those of requests without that salt (vLLM's cache_salt, e.g. one per
    tenant). An AsyncEngine on this LLM follows its own SchedulerConfig.

    tensor_parallel: split the model over this many processes (torch backend; start them with
    `torchrun --nproc-per-node N`, each constructing the LLM; device "cuda" gives each rank the GPU
    of its LOCAL_RANK, "cpu" runs gloo). Each rank reads only its slices of the weights. Rank 0
    (`is_leader`) owns the tokenizer and the engine and generates; every other rank calls
    `follow()`, which returns when the leader calls `close()`.

    The engine (`core`: one scheduler over the backend's KV pages) is driven either by this
    object's generate / stream / chat or by an `AsyncEngine` built on it, one at a time.
    `close()` releases the backend's device (and a tensor-parallel group).
    """

    def __init__(self, model: str | Path | None = None, *, backend: str = "torch",
                 device: str = "cpu", dtype: str = "float32", max_batch: int = 8,
                 max_seq_len: int | None = None, block_size: int = 32,
                 num_blocks: int | None = None,
                 cache_dir: str | Path | None = None, progress: bool = True,
                 backend_options: Mapping[str, Any] | None = None,
                 tensor_parallel: int = 1, weights: str = "auto",
                 prefix_cache: bool = True, int4_group: int | None = None) -> None:
        spec = BackendSpec(model=model, device=device, dtype=dtype, max_batch=max_batch,
                           max_seq_len=max_seq_len, block_size=block_size,
                           num_blocks=num_blocks, cache_dir=cache_dir, progress=progress,
                           tensor_parallel=tensor_parallel, weights=weights,
                           options=dict(backend_options or {}), int4_group=int4_group)
        self.backend = create_backend(backend, spec)
        self.config = self.backend.config
        self.runtime = self.backend.runtime
        self.tokenizer = self.core = self.generator = None
        if not self.backend.leader:
            return
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.tokenizer = Tokenizer.from_path(self.backend.source, cache_dir=cache,
                                             digest=self.backend.source_sha256, progress=progress)
        self.core = EngineCore(self.backend, self.tokenizer,
                               SchedulerConfig(prefix_cache=prefix_cache))
        self.generator = Generator(self.core)

    @property
    def capabilities(self) -> Capabilities:
        """What the backend can serve (sampling modes, batch, context)."""
        return self.backend.capabilities

    @property
    def is_leader(self) -> bool:
        """True on a single process and on rank 0 of a tensor-parallel group."""
        return self.backend.leader

    def follow(self) -> int:
        """On a tensor-parallel follower rank: run the leader's steps until it closes."""
        if self.is_leader:
            raise RuntimeError("follow() is for tensor-parallel ranks other than 0")
        return self.backend.follow()

    def close(self) -> None:
        """Release the backend's device; on rank 0 of a tensor-parallel group also release the
        followers and leave the group. Later generate calls are an error. Idempotent.
        EngineBusyError while an AsyncEngine drives the model (its thread may be in a step:
        shut it down first); a synchronous stream left open ends with an error at its next step.
        """
        if self.core is not None:
            self.core.check_idle("close()", but=self.generator)
        if not self.backend.closed:
            self.backend.close()
        if self.core is not None:
            self.core.scheduler.grammars.close()  # structured output's worker thread, if any

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, prompts: str | Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, chat: bool = False) -> list[RequestOutput]:
        """Complete each prompt (text or token ids); with chat=True each is one user message.
        One RequestOutput per prompt; with SamplingParams n > 1 (or best_of) it is the first of
        the prompt's choices, all of which are in its `choices`."""
        return self._leader().generate(_as_list(prompts), params, chat)

    def stream(self, prompts: str | Sequence[str | Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams] | None = None,
               *, chat: bool = False) -> Iterator[StreamEvent]:
        """Like generate, yielding text deltas as they are produced. With best_of > n every
        sequence streams (StreamEvent.choice is its RequestOutput.sequence); the final output's
        choices are the n best, renumbered, each keeping its `sequence`."""
        return self._leader().stream(_as_list(prompts), params, chat)

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None, *,
             add_generation_prompt: bool | None = None, continue_final_message: bool = False,
             chat_template_kwargs: Mapping[str, Any] | None = None) -> RequestOutput:
        """Answer one conversation (list of {"role", "content"}) rendered by the model's chat
        template. add_generation_prompt: open a new assistant turn after the messages (default:
        unless continue_final_message). continue_final_message: continue the last message where
        it ends instead (e.g. an assistant answer begun by the caller); the output holds only the
        new text. Both True is a TokenizerError. chat_template_kwargs: more variables for the
        template (e.g. {"enable_thinking": False}).
        """
        self._leader()
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, template_kwargs=chat_template_kwargs)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return self._leader().generate([ids], params)[0]

    def _leader(self) -> Generator:
        if self.generator is None:
            raise RuntimeError("this tensor-parallel rank follows rank 0: call follow(), not "
                               "generate/stream/chat")
        if self.backend.closed:
            raise RuntimeError("this LLM was closed")
        return self.generator


def _as_list(prompts: str | Sequence[str | Sequence[int]]) -> list[str | Sequence[int]]:
    if isinstance(prompts, str):
        return [prompts]
    if prompts and isinstance(prompts[0], int):  # one prompt given as token ids
        return [prompts]  # type: ignore[list-item]
    return list(prompts)
