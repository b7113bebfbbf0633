"""The tt Backend: opens real ttnn on a usable device, else `llm.ttnn_emu` (see
`llm.backends.tt.device`), builds the model on a (virtual) mesh and serves the Generator's
prefill/decode calls.

Only this module and `device` ask which ttnn they have (to open the device and to label
`describe()`); the model code receives the module through `Mesh.ttnn`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llm.backends.tt.device import open_mesh
from llm.backends.tt.logprobs import prompt_logprobs, select_row
from llm.backends.tt.mesh import TILE
from llm.backends.tt.model import Transformer
from llm.backends.tt.op_configs import OpConfigs
from llm.backends.tt.penalties import full_path
from llm.backends.tt.precision import POLICIES, default_overrides, precision
from llm.backends.tt.sampling import filters_for, host_inputs
from llm.backends.tt.trace import DecodeRunner
from llm.backends.tt.weights import WeightStore
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
from llm.model.checkpoint.common import Checkpoint
from llm.model.config import ConfigError, RuntimeConfig
from llm.model.paths import default_cache_dir
from llm.model.quant.tensor import QuantizedTensor


def parse_mesh(mesh: str | tuple[int, int] | None) -> tuple[int, int]:
    """"RxC" or (R, C) -> (R, C); None means 1x1."""
    if mesh is None:
        return (1, 1)
    if isinstance(mesh, str):
        try:
            rows, cols = (int(v) for v in mesh.lower().split("x"))
        except ValueError as e:
            raise ValueError(f"mesh must look like ROWSxCOLS (e.g. 1x8), got {mesh!r}") from e
    else:
        rows, cols = mesh
    if rows < 1 or cols < 1:
        raise ValueError(f"mesh dimensions must be positive, got {rows}x{cols}")
    return rows, cols


def _model_key(checkpoint: Checkpoint) -> str:
    src = Path(checkpoint.source)
    digest = checkpoint.source_sha256
    if digest is None:  # HF directory: its config plus the weight files' sizes and mtimes
        h = hashlib.sha256(json.dumps(checkpoint.config.to_hf_dict(), sort_keys=True).encode())
        for f in sorted(src.glob("*.safetensors")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        digest = h.hexdigest()
    return f"{src.stem}-{digest[:16]}"


def converter_key(package: Path = Path(__file__).parent) -> str:
    """A digest of the tt backend's sources (`package`/*.py): part of the weight cache's path,
    so a change to how weights are converted (permuted, padded, quantized, split) never loads
    files an older conversion wrote (the checkpoint's own digest cannot see that change)."""
    h = hashlib.sha256()
    for f in sorted(package.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


class TTBackend(Backend):
    """The Llama model in TT-NN on one device or a 1-D tensor-parallel mesh; greedy decoding."""

    name = "tt"

    def __init__(self, checkpoint: Checkpoint, runtime: RuntimeConfig, *,
                 mesh: str | tuple[int, int] | None = None, precision_policy: str = "accuracy",
                 decoder_precision: str | Path | dict[str, Any] | None = None,
                 trace: bool = True, implementation: str = "auto",
                 weights_dir: str | Path | None = None, cache: bool = True,
                 max_columns_per_device: int = 16384, qkv_chunk: int = 2048,
                 mlp_chunk: int = 1024) -> None:
        if precision_policy not in POLICIES:
            raise ValueError(f"precision must be one of {', '.join(POLICIES)}, "
                             f"got {precision_policy!r}")
        self.config = checkpoint.config
        self.runtime = runtime
        self.source = Path(checkpoint.source) if checkpoint.source is not None else None
        self.source_sha256 = checkpoint.source_sha256
        shape = parse_mesh(mesh)
        self.mesh, self.implementation = open_mesh(shape, implementation)
        ttnn = self.mesh.ttnn
        self.host_compute = bool(getattr(ttnn, "EMULATED", False))
        try:
            if decoder_precision is None:
                decoder_precision = default_overrides(precision_policy, self.config)
            self.decoder_precision = decoder_precision
            self.precision = precision(ttnn, precision_policy, self.config.num_layers,
                                       decoder_precision)
            self.cfg = OpConfigs.build(self.mesh, self.config, runtime, self.precision,
                                       max_columns_per_device=max_columns_per_device,
                                       qkv_chunk=qkv_chunk, mlp_chunk=mlp_chunk)
            if weights_dir is None and cache and checkpoint.source is not None:
                impl = "emu" if getattr(ttnn, "EMULATED", False) else "ttnn"
                weights_dir = (default_cache_dir() / _model_key(checkpoint) / "tt" /
                               precision_policy /
                               f"{impl}-{shape[0]}x{shape[1]}-{converter_key()}")
            self.weights = WeightStore(self.mesh, weights_dir if cache else None)
            self.model = Transformer(self.mesh, self.config, runtime, checkpoint.tensors,
                                     self.cfg, self.weights)
            self.decoder = DecodeRunner(self.model, traced=trace)
        except BaseException:
            ttnn.close_mesh_device(self.mesh.device)  # do not leave a real device open
            raise

    @property
    def capabilities(self) -> Capabilities:
        """Greedy decoding (on-device argmax), temperature / min-p / top-k / top-p sampling and
        every feature (logprobs, prompt logprobs, penalties, logit_bias, min_tokens, structured
        output) on the device (sampling.py, logprobs.py); a vocabulary too wide for one
        ttnn.topk: greedy only, no features."""
        supported = self.model.sampler.supported
        modes = SAMPLING_MODES if supported else frozenset({"greedy"})
        return Capabilities(modes, self.runtime.max_batch, self.runtime.max_seq_len,
                            FEATURES if supported else frozenset())

    def close(self) -> None:
        """Release the decode trace and close the device (the backend is unusable after).
        Idempotent."""
        if self.closed:
            return
        super().close()
        self.decoder.release()
        self.mesh.ttnn.close_mesh_device(self.mesh.device)

    def describe(self) -> str:
        p = self.precision
        d = p.decoder(0)
        changed = f", {len(p.overridden)} decoder(s) overridden" if p.overridden else ""
        if isinstance(self.decoder_precision, str):
            changed += f", decoder preset {self.decoder_precision}"
        return (f"tt backend on {self.implementation}, mesh {self.mesh.rows}x{self.mesh.cols}, "
                f"{p.name} precision (decoder 0: wqkv {d.wqkv.name}, w1/w3 {d.w1.name}, KV "
                f"{d.kv_cache.name}{changed}), decode "
                f"{'traced' if self.decoder.traced else 'untraced'}")

    def _check_call(self, sampling: list[SequenceSampling]) -> None:
        """The engine checks capabilities at submission; a direct caller gets the same error."""
        if self.closed:
            raise RuntimeError("the tt backend was closed")
        for s in sampling:
            self.capabilities.check(s.params, self.name)

    def prefill(self, inp: PrefillInput) -> int:
        """One user's prompt, or a chunk of it at start_pos (a multiple of the block size)."""
        return self.prefill_step(dataclasses.replace(inp, forks=(), select=True)).tokens[0]

    def prefill_step(self, inp: PrefillInput,
                     launched: Callable[[], None] | None = None) -> StepOutput:
        """`prefill`, with the logprobs the request asked for; forks (n > 1) draw their first
        tokens from the same last logits, each with its own sampling parameters and seed.
        launched: see the contract (called once the chunk's forward is enqueued)."""
        return self._prefill(inp, [inp.sampling] + [f.sampling for f in inp.forks], launched)

    def _prefill(self, inp: PrefillInput, users: list[SequenceSampling],
                 launched: Callable[[], None] | None = None) -> StepOutput:
        """Run the chunk; then the token each of `users` chooses from its last position."""
        self._check_call(users)
        ttnn, mesh, model = self.mesh.ttnn, self.mesh, self.model
        start, n, bs = inp.start_pos, len(inp.tokens), self.runtime.block_size
        if start % bs:
            raise ValueError(f"tt backend: a prefill chunk must start at a multiple of the block "
                             f"size {bs}, got start_pos {start}")
        s = self.cfg.prefill_length(n)
        if start + s > len(inp.page_table) * bs:
            raise ValueError(f"tt backend: prefill chunk [{start}, {start + n}) padded to {s} "
                             f"tokens exceeds the user's {len(inp.page_table)} pages")
        tok = torch.zeros(1, 1, 1, s, dtype=torch.int64)
        tok[0, 0, 0, :n] = torch.tensor(list(inp.tokens), dtype=torch.int64)

        def put(values: torch.Tensor, dtype):
            return ttnn.from_torch(values, dtype=dtype, layout=ttnn.ROW_MAJOR_LAYOUT,
                                   device=mesh.device, memory_config=ttnn.DRAM_MEMORY_CONFIG,
                                   mesh_mapper=mesh.replicate())

        pages = torch.tensor([list(inp.page_table)], dtype=torch.int64)  # [1, max_blocks]
        fill_row = None
        if start > 0:
            fill_row = put(pages[:, start // bs:], ttnn.int32)  # this chunk's pages onwards
        hidden = model.prefill_hidden(put(tok, ttnn.uint32), put(pages, ttnn.int32), start,
                                      fill_row, n)  # [1, 1, S, dim_local]
        if launched is not None:  # ops are enqueued; the reads below wait for them
            launched()
        slots = [inp.slot] + [f.slot for f in inp.forks]
        if model.penalties is not None:
            self._admit(inp)
        prompt = None
        if inp.targets is not None:
            params = inp.sampling.params
            if params.prompt_logprobs is None:
                raise ValueError("PrefillInput.targets given for a request without "
                                 "prompt_logprobs")
            prompt = prompt_logprobs(mesh, lambda t: model.tile_logits(hidden, t),
                                     model.sampler, model.penalties, model.logprob_ops,
                                     params.temperature, inp.targets, params.prompt_logprobs)
        if not inp.select:  # a chunk before the prompt's last: its K/V are written
            ttnn.deallocate(hidden)
            return StepOutput((), None, prompt)
        logits = model.tile_logits(hidden, (n - 1) // TILE)  # [1, 1, 32, V_local]
        row = (n - 1) % TILE  # the row holding the last token, which draws token start + n
        if full_path(users, inp.allowed is not None) or prompt is not None:
            out = select_row(model, self.decoder.inputs.layouts, logits, row, users, slots,
                             start + n, inp.allowed)
            ttnn.deallocate(hidden)
            return StepOutput(out.tokens, out.logprobs, prompt)
        tokens = []
        for user in users:
            if user.params.greedy:
                out = model.lm_head.argmax(logits)  # uint32 [1, 1, 32]
            else:
                filters = filters_for([user.params])
                out = model.sampler(logits, **model.sampler.put(host_inputs(
                    {row: (user.params, user.seed, start + n)})),
                    cdf=model.inverse_cdf if filters else None,
                    filters=filters)  # [1, 1, 1, 32]
            tokens.append(int(mesh.read(out).reshape(-1)[row].to(torch.int64)))
        return StepOutput(tokens)

    def _admit(self, inp: PrefillInput) -> None:
        """The per-slot penalty state of a prefill chunk (penalties.py; host mirror only)."""
        pen = self.model.penalties
        end = inp.start_pos + len(inp.tokens)
        if inp.start_pos == len(inp.cached):  # the request's first call
            pen.begin(inp.slot, inp.sampling)
            if inp.cached:  # a prefix-cache hit: its tokens are prompt tokens too
                pen.add_prompt(inp.slot, inp.sampling, list(inp.cached), inp.start_pos)
        pen.add_prompt(inp.slot, inp.sampling, list(inp.tokens), end)
        for fork in inp.forks:
            pen.fork(inp.slot, fork.slot)

    def copy_pages(self, pairs) -> None:
        """See the contract (Backend.copy_pages)."""
        self._check_call([])
        self.model.cache.copy_pages(list(pairs))

    def decode(self, inp: DecodeInput) -> list[int]:
        return list(self.decode_step(inp).tokens)

    def decode_step(self, inp: DecodeInput) -> StepOutput:
        """`decode`, with the logprobs the requests asked for (see the contract)."""
        self._check_call(list(inp.sampling))
        tokens, logprobs = self.decoder.step(list(inp.slots), list(inp.tokens),
                                             list(inp.positions),
                                             [list(r) for r in inp.page_table],
                                             list(inp.sampling), inp.allowed)
        return StepOutput(tokens, logprobs)

    def step_cost(self) -> Any:
        """Per-chip DRAM bytes and FLOPs of the latest traced decode step (emulator only)."""
        cost_of = getattr(self.mesh.ttnn, "trace_step_cost", None)
        if cost_of is None or self.decoder.trace_id is None:
            return None
        return cost_of(self.mesh.device, self.decoder.trace_id)


_OPTIONS = ("mesh", "precision", "decoder_precision", "trace", "implementation", "weights_dir",
            "cache", "max_columns_per_device", "qkv_chunk", "mlp_chunk")


def create(spec: BackendSpec) -> TTBackend:
    """Registry entry point (see llm.engine.contract.backend.create_backend). Options: mesh
    ("RxC", e.g. "1x8": the device mesh the model is split over), precision ("accuracy" |
    "performance"), decoder_precision (per-decoder overrides: a precision.PRESETS name, a .json
    file or a mapping, see precision.parse_overrides), trace, implementation ("auto" | "ttnn" |
    "emulator"), weights_dir, cache, max_columns_per_device, qkv_chunk, mlp_chunk."""
    if spec.tensor_parallel != 1:
        raise ConfigError("the tt backend splits a model over its device mesh (option "
                          f"mesh='1x8'), not over processes: tensor_parallel={spec.tensor_parallel}"
                          " needs the torch backend")
    # torch's settings: refused, not ignored (the tt backend runs on a Tenstorrent device or the
    # emulator, in the number formats its precision policy picks, from dequantized weights)
    for name, value, ok, instead in (
            ("device", spec.device, ("cpu",), "the tt backend picks its device (option "
                                              "implementation)"),
            ("dtype", spec.dtype, ("float32",), "the tt backend's number formats come from "
                                                "its precision policy (option precision)"),
            ("weights", spec.weights, ("auto", "dequantize"), "the tt backend converts every "
                                                               "weight to its own tile formats"),
            ("int4_group", spec.int4_group, (None,), "the tt backend converts every weight to "
                                                     "its own tile formats")):
        if value not in ok:
            raise ConfigError(f"{name}={value!r} applies to the torch backend: {instead}")
    options = dict(spec.options)
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown tt backend option(s) {', '.join(unknown)} "
                          f"(known: {', '.join(_OPTIONS)})")
    if "precision" in options:
        options["precision_policy"] = options.pop("precision")
    checkpoint = spec.load()
    if any(isinstance(t, QuantizedTensor) for t in checkpoint.tensors.values()):
        # the tt backend converts every weight to its own tile formats (bf16 / bfloat8_b /
        # bfloat4_b); quantized-as-stored weights are dequantized first (exact ggml values)
        tensors = {k: t.dequantize() if isinstance(t, QuantizedTensor) else t
                   for k, t in checkpoint.tensors.items()}
        checkpoint = dataclasses.replace(checkpoint, tensors=tensors)
    return TTBackend(checkpoint, spec.runtime(checkpoint.config), **options)
