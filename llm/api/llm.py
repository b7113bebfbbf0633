"""`LLM`: the one-object API for applications (load a model, generate, stream, chat)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from llm.engine.contract.backend import create_backend
from llm.engine.contract.sampling_params import SamplingParams
from llm.engine.generator import Generator, RequestOutput, StreamEvent
from llm.model.checkpoint.load import load_checkpoint
from llm.model.config import ConfigError, ModelConfig, RuntimeConfig
from llm.model.paths import default_cache_dir, default_model_path
from llm.model.tokenizer.tokenizer import Tokenizer

DEFAULT_MAX_SEQ_LEN = 2048


class LLM:
    """A loaded model ready to generate.

    model: a Hugging Face directory, a .gguf file, or None for the embedded SmolLM2-135M-Instruct.
    max_seq_len: longest prompt + completion per request (default: the model's context, at most
    2048). max_batch: users decoded together. num_blocks: KV pages in the pool (default: every slot
    at max_seq_len). backend_options: keyword arguments for the backend's `create` (its runner).

    tensor_parallel: split the model over this many processes (torch backend; start them with
    `torchrun --nproc-per-node N`, each constructing the LLM; device "cuda" gives each rank the GPU
    of its LOCAL_RANK, "cpu" runs gloo). Each rank reads only its slices of the weights. Rank 0
    (`is_leader`) owns the tokenizer and the Generator and generates; every other rank calls
    `follow()`, which returns when the leader calls `close()`.
    """

    def __init__(self, model: str | Path | None = None, *, backend: str = "torch",
                 device: str = "cpu", dtype: str = "float32", max_batch: int = 8,
                 max_seq_len: int | None = None, block_size: int = 32,
                 num_blocks: int | None = None,
                 cache_dir: str | Path | None = None, progress: bool = True,
                 backend_options: Mapping[str, Any] | None = None,
                 tensor_parallel: int = 1) -> None:
        if tensor_parallel != 1:  # a wrong launch is an error before any model file is looked at
            self._check_launch(backend, device, tensor_parallel)
        path = Path(model) if model is not None else default_model_path()
        self.mesh = None
        self.checkpoint = None
        if tensor_parallel == 1:
            self.checkpoint = load_checkpoint(path, cache_dir=cache_dir, progress=progress)
            weights: Any = self.checkpoint
            digest = self.checkpoint.source_sha256
        else:
            weights, device = self._join_mesh(path, device, cache_dir, progress,
                                              tensor_parallel)
            digest = weights.source_sha256
            progress = progress and self.mesh.leader
            backend_options = {**dict(backend_options or {}), "mesh": self.mesh}
        self.config = weights.config
        self.runtime = RuntimeConfig(device=device, dtype=dtype, max_batch=max_batch,
                                     max_seq_len=self._max_seq_len(self.config, max_seq_len),
                                     block_size=block_size, num_blocks=num_blocks)
        self.backend = create_backend(backend, weights, self.runtime, backend_options)
        self.tokenizer = self.generator = None
        if self.mesh is not None:
            from llm.backends.torch.parallel.leader import LeaderBackend

            weights.close()
            if not self.mesh.leader:
                return
            self.backend = LeaderBackend(self.backend, self.mesh)
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.tokenizer = Tokenizer.from_path(path, cache_dir=cache, digest=digest)
        self.generator = Generator(self.backend, self.tokenizer)

    @staticmethod
    def _check_launch(backend: str, device: str, size: int) -> None:
        """ConfigError unless this process can be one of `size` tensor-parallel ranks."""
        if backend != "torch":
            raise ConfigError(f"tensor_parallel needs the torch backend, not {backend!r}")
        from llm.backends.torch.parallel.mesh import Mesh

        Mesh.check_launch(size, device)

    def _join_mesh(self, path: Path, device: str, cache_dir: str | Path | None, progress: bool,
                   size: int):
        """Check the split (a clear error before any weight is read), join the process group;
        returns this rank's weight slices and device.
        """
        from llm.backends.torch.parallel.mesh import Mesh
        from llm.backends.torch.parallel.plan import TensorParallelPlan
        from llm.backends.torch.parallel.slices import open_weight_slices

        weights = open_weight_slices(path, cache_dir=cache_dir, progress=progress)
        TensorParallelPlan(weights.config, size)
        self.mesh, device = Mesh.from_env(size, device)
        return weights, device

    @staticmethod
    def _max_seq_len(config: ModelConfig, max_seq_len: int | None) -> int:
        limit = config.max_context
        if max_seq_len is None:
            return min(limit, DEFAULT_MAX_SEQ_LEN)
        if max_seq_len > limit:
            raise ConfigError(
                f"max_seq_len={max_seq_len} exceeds the model's context of {limit} tokens")
        return max_seq_len

    @property
    def is_leader(self) -> bool:
        """True on a single process and on rank 0 of a tensor-parallel group."""
        return self.mesh is None or self.mesh.leader

    def follow(self) -> int:
        """On a tensor-parallel follower rank: run the leader's steps until it closes."""
        from llm.backends.torch.parallel.leader import follow

        if self.is_leader:
            raise RuntimeError("follow() is for tensor-parallel ranks other than 0")
        try:
            return follow(self.backend, self.mesh)
        finally:
            self.mesh.close()

    def close(self) -> None:
        """Release a tensor-parallel group's followers and leave it (no-op on one process)."""
        if self.mesh is not None and self.mesh.leader and not self.backend.closed:
            self.backend.close()
            self.mesh.close()

    def generate(self, prompts: str | Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, chat: bool = False) -> list[RequestOutput]:
        """Complete each prompt (text or token ids); with chat=True each is one user message."""
        return self._leader().generate(_as_list(prompts), params, chat)

    def stream(self, prompts: str | Sequence[str | Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams] | None = None,
               *, chat: bool = False) -> Iterator[StreamEvent]:
        """Like generate, yielding text deltas as they are produced."""
        return self._leader().stream(_as_list(prompts), params, chat)

    def chat(self, messages: list[dict[str, str]],
             params: SamplingParams | None = None) -> RequestOutput:
        """Answer one conversation (list of {"role", "content"}) rendered by the model's chat
        template.
        """
        self._leader()
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return self._leader().generate([ids], params)[0]

    def _leader(self) -> Generator:
        if self.generator is None:
            raise RuntimeError(f"rank {self.mesh.rank} follows rank 0: call follow(), not "
                               "generate/stream/chat")
        return self.generator


def _as_list(prompts: str | Sequence[str | Sequence[int]]) -> list[str | Sequence[int]]:
    if isinstance(prompts, str):
        return [prompts]
    if prompts and isinstance(prompts[0], int):  # one prompt given as token ids
        return [prompts]  # type: ignore[list-item]
    return list(prompts)
