"""The torch Backend: the Transformer, its paged KV cache and on-device sampling."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from llm.backends.torch.graphs import DecodeGraphs
from llm.backends.torch.kv_cache import PagedKVCache
from llm.backends.torch.logprobs import prompt_logprobs, select, to_host
from llm.backends.torch.model import Transformer
from llm.backends.torch.parallel.mesh import Mesh
from llm.backends.torch.parallel.slices import WeightSlices
from llm.backends.torch.penalties import SlotPenalties, full_path
from llm.backends.torch.prefill_graphs import PrefillGraphs
from llm.backends.torch.quant.cpu import describe_kinds
from llm.backends.torch.quant.native import NativeKernels, NativeKernelsUnavailable, load_kernels
from llm.backends.torch.sampling import SamplingTensors, column_hashes
from llm.backends.torch.threads import (
    WIDE_DECODE_BATCH,
    ThreadPolicy,
    check_threads,
    intra_op_threads,
)
from llm.backends.torch.token_masks import apply_token_masks
from llm.engine.contract.backend import (
    FEATURES,
    SAMPLING_MODES,
    Backend,
    BackendSpec,
    Capabilities,
    DecodeInput,
    PrefillInput,
    SequenceSampling,
)
from llm.engine.contract.outputs import StepOutput
from llm.engine.contract.structured import TokenMasks
from llm.model.checkpoint.common import Checkpoint
from llm.model.config import ConfigError, RuntimeConfig
from llm.model.paths import default_cache_dir


def _nothing() -> None:
    """The `launched` of a prefill_step call that was given none (and of decode's selection)."""


class TorchBackend(Backend):
    """PyTorch on CPU or CUDA, fp32 / bf16 / fp16; one process, or one rank of a tensor-parallel
    mesh (every rank runs the same calls; see llm.backends.torch.parallel.leader).
    """

    name = "torch"

    def __init__(self, checkpoint: Checkpoint | WeightSlices, runtime: RuntimeConfig,
                 cuda_graphs: bool = True, mesh: Mesh | None = None,
                 all_reduce: str = "auto", gemv_max_batch: int | None = None,
                 threads: int | None = None, native_kernels: bool | None = None,
                 cache_dir: str | Path | None = None, progress: bool = False) -> None:
        """checkpoint: loaded weights, or slices read per rank (tensor parallel).
        cuda_graphs: on CUDA with the Triton paged attention, capture decode as CUDA graphs, and
        (one rank) prompt chunks, first ones and continuations, per padded length bucket
        (prefill_graphs.py; without graphs the same padded prefill runs eagerly).
        all_reduce (tensor parallel on GPUs): "nccl", or "auto" = decode-sized all-reduces by the
        symmetric-memory one-shot kernel where available, larger ones by NCCL.
        gemv_max_batch: see Transformer (None: its default).
        threads: on the CPU, intra-op threads for prefill and decode alike (None: the measured
        ThreadPolicy.default, see llm.backends.torch.threads); set around each call, restored
        after. Not allowed on CUDA, where the thread count is never touched.
        native_kernels: on the CPU in float32, apply quantized weights with the C kernels
        (quant/cpu_kernels.c, built on first use into `cache_dir`/kernels; without a C compiler a
        warning says why and the layers are dequantized once instead). None: where that applies;
        True: the same, and any other device or dtype is refused; False: torch ops only.
        progress: say when the C kernels are being built (first use on a machine).
        """
        if all_reduce not in ("auto", "nccl"):
            raise ValueError(f"all_reduce must be 'auto' or 'nccl', got {all_reduce!r}")
        if threads is not None:
            check_threads(threads)
            if not runtime.device.startswith("cpu"):
                raise ValueError(f"threads applies to the CPU device only, not {runtime.device!r}")
        if runtime.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {runtime.device!r}: this machine has 0 CUDA device(s)")
        self.config = checkpoint.config
        self.runtime = runtime
        source = getattr(checkpoint, "source", None)
        self.source = Path(source) if source is not None else None
        self.source_sha256 = checkpoint.source_sha256
        self.device = check_device(runtime.device)
        self.mesh = mesh or Mesh.single()
        if all_reduce == "auto":
            self.mesh = self.mesh.with_symmetric(getattr(torch, runtime.dtype), self.device,
                                                 runtime.max_batch * self.config.hidden_size)
        weights = checkpoint if isinstance(checkpoint, WeightSlices) else checkpoint.tensors
        self.kernels = None
        applies = self.device.type == "cpu" and runtime.dtype == "float32"
        if native_kernels and not applies:
            raise ValueError(f"native_kernels=True needs device cpu and dtype float32, not "
                             f"{runtime.device} {runtime.dtype} (None: where they apply)")
        if native_kernels is not False and applies:
            self.kernels = _native_kernels(cache_dir, progress)
        self.model = Transformer(self.config, weights, runtime, mesh=self.mesh,
                                 gemv_max_batch=gemv_max_batch, cpu_kernels=self.kernels)
        self.threads: ThreadPolicy | None = None  # None: the thread count is left alone
        if self.device.type == "cpu":  # a step by the C kernels uses every free core from batch 1
            wide = 1 if self.model.cpu_kernels is not None else WIDE_DECODE_BATCH
            self.threads = (ThreadPolicy.default(wide_decode_batch=wide) if threads is None
                            else ThreadPolicy.fixed(threads))
        self.cache = PagedKVCache(self.model.local, runtime, self.device, self.model.dtype)
        self.penalties = SlotPenalties(runtime.max_batch, self.config.vocab_size, self.device)
        # the CPU draw's per-token hashes, once (CUDA hashes in its Triton kernel's registers)
        self._col_hash = (column_hashes(self.config.vocab_size, self.device)
                          if self.device.type == "cpu" else None)
        self.weight_bytes = self.model.weight_bytes
        self.host_compute = self.device.type == "cpu"
        self.graphs = None
        if cuda_graphs and self.device.type == "cuda" and self.model.decode_kernel:
            self.graphs = DecodeGraphs(self.model, self.cache, runtime.max_batch,
                                       runtime.blocks_per_seq, self.penalties)
            self.graphs.capture()
        self.prefill_graphs = None  # padded prompts on one CUDA rank; graphs with cuda_graphs
        if self.device.type == "cuda" and self.model.decode_kernel and self.mesh.size == 1:
            self.prefill_graphs = PrefillGraphs(self.model, self.cache, runtime.max_seq_len,
                                                runtime.blocks_per_seq)
            if cuda_graphs:
                self.prefill_graphs.capture()

    @property
    def capabilities(self) -> Capabilities:
        """Every sampling mode (greedy, temperature, top-k, top-p) and every feature (logprobs,
        prompt logprobs, penalties, logit_bias, min_tokens, structured output), on the device;
        tensor parallel: all but structured output."""
        features = FEATURES if self.mesh.size == 1 else FEATURES - {"structured_output"}
        return Capabilities(SAMPLING_MODES, self.runtime.max_batch, self.runtime.max_seq_len,
                            features)

    def close(self) -> None:
        """Drop the CUDA graphs, the KV cache and the weights (their memory returns to the
        allocator); later calls are an error."""
        if self.closed:
            return
        self._closed_description = self.describe() + ", closed"
        super().close()
        self.graphs = self.prefill_graphs = None
        self.cache = self.model = self.penalties = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("the torch backend was closed")

    def describe(self) -> str:
        if self.closed:
            return self._closed_description
        mode = "eager"
        if self.graphs is not None:
            mode = f"CUDA graphs, decode captured in {self.graphs.capture_s:.1f} s"
            pg = self.prefill_graphs
            if pg is not None and pg.graphs:
                chunks = "prompt chunks" if pg.continuations else "first prompt chunks"
                mode += f", {chunks} of <= {pg.buckets[-1]} tokens in {pg.capture_s:.1f} s"
        elif self.model.decode_kernel:
            mode = "eager, Triton paged attention"
        tp = ""
        if self.mesh.size > 1:
            ar = "symmetric-memory" if self.mesh.symmetric is not None else self.mesh.library
            tp = f", rank {self.mesh.rank} of {self.mesh.size}, {ar} all-reduce in decode"
        cpu = f", {self.threads.describe()}" if self.threads is not None else ""
        kinds = self.model.cpu_layer_kinds() if self.device.type == "cpu" else {}
        if kinds:  # (a quantized embedding alone runs no quantized matrix)
            cpu += ", " + describe_kinds(kinds)
        return f"torch backend on {self.device} ({self.runtime.dtype}, {mode}{tp}{cpu})"

    def _threads(self, phase: str, batch: int = 1) -> AbstractContextManager[None]:
        """A context running one call with the policy's thread count for `phase` (CPU only)."""
        if self.threads is None:
            return nullcontext()
        return intra_op_threads(self.threads.count(phase, batch))

    def _tensor(self, values, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _select(self, logits: torch.Tensor, sampling: list[SequenceSampling], slots: list[int],
                positions: list[int], full: bool, allowed: TokenMasks | None = None,
                launched: Callable[[], None] = _nothing) -> StepOutput:
        """logits [B, V(_local)] -> tokens (and logprobs); `positions` are those of the tokens
        being chosen. full: the penalty / logprobs path (see logprobs.select). allowed: the
        structured-output masks, applied first (one rank: the whole vocabulary is local).
        launched: called before the first copy that waits for the device (prefill_step's)."""
        if allowed is not None:  # the masks may wait for the grammar thread, and copy
            launched()
            launched = _nothing
            logits = apply_token_masks(logits, allowed)
        params = [s.params for s in sampling]
        all_greedy = all(p.greedy for p in params)
        if all_greedy and not full:  # an argmax: no sampling tensors to copy to the device
            tokens = self.model.sample(logits, None, None, True)
            launched()
            return StepOutput(tokens.tolist())
        launched()  # (the sampling tensors' copies from pageable memory wait for the device)
        st = SamplingTensors.build(params, [s.seed for s in sampling], self.device,
                                   self._col_hash)
        pos = self._tensor(positions)
        if not full:
            return StepOutput(self.model.sample(logits, st, pos, all_greedy).tolist())
        sel = select(self.model.gather_logits(logits), st, pos, all_greedy, self.penalties,
                     self._tensor(slots))
        tokens = sel.tokens.tolist()
        wanted = [p.logprobs for p in params]
        if all(k is None for k in wanted):
            return StepOutput(tokens)
        return StepOutput(tokens, to_host(tokens, sel.logprob.cpu(), sel.top_values.cpu(),
                                          sel.top_ids.cpu(), wanted))

    def prefill(self, inp: PrefillInput) -> int:
        return self.prefill_step(dataclasses.replace(inp, select=True)).tokens[0]

    def prefill_step(self, inp: PrefillInput,
                     launched: Callable[[], None] | None = None) -> StepOutput:
        """`prefill`, with the logprobs the request asked for (see the contract)."""
        self._check_open()
        with self._threads("prefill"):
            return self._prefill(inp, launched or _nothing)

    def _prefill(self, inp: PrefillInput, launched: Callable[[], None]) -> StepOutput:
        if self.graphs is not None:
            self.graphs.reset()  # a new user changes the batch: the step launched ahead is moot
        end = inp.start_pos + len(inp.tokens)
        if inp.start_pos == len(inp.cached):  # the request's first call
            self.penalties.begin(inp.slot, inp.sampling)
            if inp.cached:  # a prefix-cache hit: its tokens are prompt tokens too
                self.penalties.add_prompt(inp.slot, inp.sampling, inp.cached, inp.start_pos)
        self.penalties.add_prompt(inp.slot, inp.sampling, inp.tokens, end)
        for fork in inp.forks:
            self.penalties.fork(inp.slot, fork.slot)
        users = [inp.sampling] + [f.sampling for f in inp.forks]  # who picks from the last logits
        slots = [inp.slot] + [f.slot for f in inp.forks]
        params = inp.sampling.params
        pg = self.prefill_graphs
        if inp.targets is None and pg is not None and pg.bucket(len(inp.tokens),
                                                                inp.start_pos) is not None:
            logits = pg.run(inp.tokens, inp.page_table, inp.start_pos)  # [V]; it stages its own
            if not inp.select:  # nothing read back: the next chunk is staged while this one runs
                launched()
                return StepOutput(())
            return self._select(logits[None].expand(len(users), -1), users, slots,
                                [end] * len(users), full_path(users), inp.allowed, launched)
        tokens = self._tensor(list(inp.tokens))  # [S]
        page_row = self._tensor(list(inp.page_table))
        if inp.targets is not None:
            if params.prompt_logprobs is None:
                raise ValueError("PrefillInput.targets given for a request without "
                                 "prompt_logprobs")
            local = self.model.prefill(tokens, inp.start_pos, page_row, self.cache,
                                       all_logits=True)  # [S, V(_local)]
            launched()
            prompt = prompt_logprobs(self.model.gather_logits(local), params.temperature,
                                     inp.targets, params.prompt_logprobs)
            if not inp.select:
                return StepOutput((), None, prompt)
            out = self._select(local[-1:].expand(len(users), -1), users, slots,
                               [end] * len(users), full=True, allowed=inp.allowed)
            return StepOutput(out.tokens, out.logprobs, prompt)
        logits = self.model.prefill(tokens, inp.start_pos, page_row, self.cache,
                                    logits=inp.select)  # [V], or None
        if logits is None:
            launched()
            return StepOutput(())
        return self._select(logits[None].expand(len(users), -1), users, slots,
                            [end] * len(users), full_path(users), inp.allowed, launched)

    def copy_pages(self, pairs) -> None:
        """See the contract (Backend.copy_pages)."""
        self._check_open()
        if pairs:
            self.cache.copy_pages(self._tensor([s for s, _ in pairs]),
                                  self._tensor([d for _, d in pairs]))

    def decode(self, inp: DecodeInput) -> list[int]:
        return list(self.decode_step(inp).tokens)

    def decode_step(self, inp: DecodeInput) -> StepOutput:
        """`decode`, with the logprobs the requests asked for (see the contract)."""
        self._check_open()
        with self._threads("decode", len(inp.slots)):
            return self._decode(inp)

    def _decode(self, inp: DecodeInput) -> StepOutput:
        positions = list(inp.positions)
        sampling = list(inp.sampling)
        full = full_path(sampling)
        if self.graphs is not None:  # structured output's masks too, applied in the graph
            return self.graphs.run(inp.slots, inp.tokens, positions, inp.page_table, sampling,
                                   full, inp.allowed)
        tokens = self._tensor(list(inp.tokens))
        pos = self._tensor(positions)
        logits = self.model.decode(tokens, pos, self._tensor([list(r) for r in inp.page_table]),
                                   self.cache, max(positions))
        if full:  # the fed tokens are generated ones: count them (once) before penalizing
            self.penalties.count(self._tensor(list(inp.slots)), tokens, pos)
        return self._select(logits, sampling, list(inp.slots), [p + 1 for p in positions], full,
                            inp.allowed)


_OPTIONS = ("cuda_graphs", "all_reduce", "gemv_max_batch", "threads", "native_kernels")


def _native_kernels(cache_dir: str | Path | None, progress: bool) -> NativeKernels | None:
    """The C kernels, built on first use; None (with a warning saying why) where they cannot be."""
    try:
        return load_kernels(Path(cache_dir) if cache_dir is not None else default_cache_dir(),
                            progress=progress)
    except NativeKernelsUnavailable as e:
        warnings.warn(f"{e}; quantized layers are dequantized to float32 instead (slower)",
                      RuntimeWarning, stacklevel=3)
        return None


def create(spec: BackendSpec) -> Backend:
    """Registry entry point (see llm.engine.contract.backend.create_backend).

    Options: cuda_graphs (bool), all_reduce ("auto" | "nccl"), gemv_max_batch (int), threads
    (int >= 1, CPU only; None = the default policy), native_kernels (bool or None); see
    TorchBackend. spec.tensor_parallel > 1 starts this process's rank (llm.backends.torch.parallel).
    """
    options = dict(spec.options)
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown torch backend option(s) {', '.join(unknown)} "
                          f"(known: {', '.join(_OPTIONS)})")
    if options.get("threads") is not None:
        try:
            check_threads(options["threads"])
        except ValueError as e:
            raise ConfigError(f"torch backend option {e}") from None
    if spec.tensor_parallel != 1:  # (the launch checks each rank's device itself)
        from llm.backends.torch.parallel.launch import launch

        return launch(spec, lambda weights, runtime, mesh: TorchBackend(
            weights, runtime, mesh=mesh, **options))
    Mesh.check_launch(1, spec.device)  # not one of several torchrun processes
    check_device(spec.device)  # before any weight is read
    # weights="auto": a GGUF's blocks as stored on the CPU (a cache entry of the GGUF's size; in
    # fp32 the layers are dequantized once, exactly, in bf16 they run torch's int4 / int8
    # kernels), dequantized on CUDA (its batched and prefill paths are faster on dense weights)
    checkpoint = spec.load(auto="stored" if spec.device == "cpu" else "dequantize")
    return TorchBackend(checkpoint, spec.runtime(checkpoint.config), cache_dir=spec.cache_dir,
                        progress=spec.progress, **options)


def check_device(name: str) -> torch.device:
    """The torch device `name`; ConfigError naming it if torch has no such device type or this
    machine has no such CUDA device."""
    try:
        device = torch.device(name)
    except RuntimeError as e:  # torch lists its device types, without the argument
        raise ConfigError(f"device {name!r} is not a torch device (cpu, cuda, cuda:N): "
                          f"{e}") from e
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise ConfigError(f"device {name!r}: this machine has {count} CUDA device(s)")
    return device
