"""Rank programs for the tensor-parallel tests: each runs in its own spawned process (gloo, CPU).

`spawn_ranks(fn, n, tmp, *args)` starts n processes running fn(rank, n, out_dir, *args) inside an
initialised gloo group and returns what each rank saved with `save(out_dir, rank, obj)`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llm.backends.torch.attention import PrefillMeta
from llm.backends.torch.kv_cache import PagedKVCache
from llm.backends.torch.model import Transformer
from llm.backends.torch.parallel.mesh import Mesh
from llm.backends.torch.parallel.quantizing_slices import QuantizingSlices, open_slices_as
from llm.backends.torch.parallel.slices import WeightSlices, open_weight_slices
from llm.backends.torch.runner import TorchBackend
from llm.engine.contract.backend import BackendSpec, SequenceSampling, create_backend
from llm.engine.contract.sampling_params import SamplingParams
from llm.engine.drive import decode_together
from llm.model.checkpoint.load import load_checkpoint
from llm.model.config import ConfigError, RuntimeConfig
from llm.model.quant.tensor import QuantizedTensor


def spawn_ranks(fn, n: int, tmp: Path, *args) -> list:
    """Run fn(rank, n, tmp, *args) on n spawned ranks of a gloo group; each rank's saved result."""
    mp.start_processes(_entry, args=(fn, n, str(tmp), args), nprocs=n, join=True,
                       start_method="spawn")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(n)]


def _entry(rank: int, fn, n: int, tmp: str, args: tuple) -> None:
    torch.set_num_threads(1)  # n ranks share the machine's cores
    os.environ.pop("WORLD_SIZE", None)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank,
                            world_size=n)
    try:
        fn(rank, n, Path(tmp), *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def mismatched_settings_rank(rank: int, n: int, tmp: Path) -> None:
    """The default model launched with weights 'stored' on rank 0 and 'dequantize' on the
    others: the error each rank raises (None if the launch went ahead)."""
    spec = BackendSpec(tensor_parallel=n, weights="stored" if rank == 0 else "dequantize",
                       max_batch=2, max_seq_len=32, progress=False, cache_dir=tmp / "cache")
    try:
        create_backend("torch", spec).close()
        error = None
    except ConfigError as e:
        error = str(e)
    save(tmp, rank, error)


def save(tmp: Path, rank: int, obj) -> None:
    torch.save(obj, tmp / f"rank{rank}.pt")


class CountingSlices(WeightSlices):
    """Counts the bytes each read returns (to show a rank reads only its slices); quantized
    tensors' bytes (all planes) also apart, by tensor name."""

    def __init__(self, inner: WeightSlices) -> None:
        self.inner, self.config, self.source = inner, inner.config, inner.source
        self.source_sha256 = inner.source_sha256
        self.bytes_read = 0
        self.quantized_bytes: dict[str, int] = {}

    def column_block(self, name):
        return self.inner.column_block(name)

    def _read(self, name, dim, start, stop):
        t = self.inner._read(name, dim, start, stop)
        if isinstance(t, QuantizedTensor):
            self.quantized_bytes[name] = self.quantized_bytes.get(name, 0) + t.nbytes
            self.bytes_read += t.nbytes
        else:
            self.bytes_read += t.numel() * t.element_size()
        return t


def small_model_rank(rank: int, n: int, tmp: Path, model_dir: str) -> None:
    """Sharded modules vs the unsharded model (same weights), greedy/sampled tokens, memory.

    With n == 1 the rank still gets the process group, so every collective path runs.
    """
    mesh = Mesh.from_env(n, "cpu")[0] if n > 1 else Mesh(0, 1, dist.group.WORLD,
                                                          dist.group.WORLD)
    full_ck = load_checkpoint(model_dir, progress=False)
    config = full_ck.config
    runtime = RuntimeConfig(device="cpu", max_batch=3, max_seq_len=64, block_size=8)
    slices = CountingSlices(open_weight_slices(model_dir, progress=False))
    tp = Transformer(config, slices, runtime, mesh=mesh)
    one = Transformer(config, full_ck.tensors, runtime)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, config.vocab_size, (11,), generator=g)
    x = torch.randn(11, config.hidden_size, generator=g)
    pcc: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    pcc["embedding"] = (tp.embed(tokens), one.embed(tokens))
    pcc["mlp"] = (tp.layers[0].mlp(x), one.layers[0].mlp(x))
    pages = torch.arange(1, 1 + runtime.blocks_per_seq)
    caches = [PagedKVCache(m.local, runtime, "cpu", torch.float32) for m in (tp, one)]
    outs = []
    for m, cache in zip((tp, one), caches):
        meta = PrefillMeta.build(m.rope, 0, 11, pages, runtime.block_size)
        attn = m.layers[0].attn.prefill(x, meta, cache)
        layer = m.layers[1].prefill(x, x, meta, cache)[0]
        outs.append((attn, layer, m.gather_logits(m.lm_head(x))))
    for i, what in enumerate(("attention", "decoder_layer", "lm_head")):
        pcc[what] = (outs[0][i], outs[1][i])
    logits = [m.gather_logits(m.prefill(tokens, 0, pages, c, all_logits=True))
              for m, c in zip((tp, one), caches)]
    pcc["model"] = (logits[0], logits[1])
    greedy = None
    if os.environ.get("TRITON_INTERPRET") == "1":  # the split Triton argmax, on CPU tensors
        tp.lm_head.fused_argmax = True
        wide = torch.randn(4, config.hidden_size, generator=g) * 30  # well-separated maxima
        greedy = [(tp.lm_head.argmax(tp.lm_head(wide)), one.lm_head.argmax(one.lm_head(wide)))]
        full = torch.randn(4, config.vocab_size, generator=g)  # crafted rows, sliced per rank
        full[0, [3, config.vocab_size - 2]] = 50.0  # equal maxima on the first and last rank
        full[1, -1] = float("nan")  # NaN wins (on the last rank), though an earlier max is larger
        full[1, 0] = 1e9
        full[2] = 7.0  # every id ties: the first
        lo = tp.lm_head.offset
        local = full[:, lo:lo + tp.lm_head.vocab_size].contiguous()
        greedy.append((tp.lm_head.argmax(local), torch.argmax(full, dim=-1)))
        tp.lm_head.fused_argmax = False
    prompts = [torch.randint(0, config.vocab_size, (k,), generator=g).tolist() for k in (5, 13, 9)]
    sampling = [SequenceSampling(SamplingParams(), 0),
                SequenceSampling(SamplingParams(temperature=0.9, top_p=0.8, seed=3), 3),
                SequenceSampling(SamplingParams(), 0)]
    backends = [TorchBackend(slices.inner, runtime, mesh=mesh), TorchBackend(full_ck, runtime)]
    tokens_out = [decode_together(b, prompts, 12, sampling) for b in backends]
    penalized = SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, logit_bias={7: 3.0},
                               min_tokens=2, logprobs=3)  # the full path, over the gathered vocab
    sampling[2] = SequenceSampling(penalized, 0, (2,))
    full_out = [decode_together(b, prompts, 12, sampling) for b in backends]
    save(tmp, rank, {"pcc": {k: (a.detach(), b.detach()) for k, (a, b) in pcc.items()},
                     "tokens": tokens_out, "tokens_full": full_out, "greedy": greedy,
                     "weight_bytes": tp.weight_bytes, "full_bytes": one.weight_bytes,
                     "bytes_read": slices.bytes_read})


def scored_params(steps: int) -> SamplingParams:
    """Logprobs, prompt logprobs and penalties: the full path and the leader's step calls."""
    return SamplingParams(max_new_tokens=steps, ignore_eos=True, logprobs=2, prompt_logprobs=1,
                          repetition_penalty=1.2, frequency_penalty=0.5)


def default_model_rank(rank: int, n: int, tmp: Path, prompts: list[str], steps: int,
                       weights: str = "auto") -> None:
    """The LLM API on the default model: rank 0 generates greedily, the others follow."""
    import llm

    model = llm.LLM(tensor_parallel=n, max_batch=len(prompts), max_seq_len=128, progress=False,
                    weights=weights)
    if not model.is_leader:
        weight_bytes = model.backend.weight_bytes
        save(tmp, rank, {"calls": model.follow(), "weight_bytes": weight_bytes})
        return
    try:
        out = model.generate(prompts, llm.SamplingParams(max_new_tokens=steps, ignore_eos=True))
        scored = model.generate(prompts, scored_params(steps))  # through LeaderBackend.*_step
        try:  # refused on the leader (what a single process supports is not named as missing)
            model.generate(prompts[:1], llm.SamplingParams(
                max_new_tokens=2, structured=llm.StructuredOutput("regex", "[ab]+")))
            refusal = None
        except llm.SamplingParamsError as e:
            refusal = str(e)
    finally:
        model.close()
    save(tmp, rank, {"tokens": [o.token_ids for o in out], "refusal": refusal,
                     "scored": [(o.token_ids, o.logprobs, o.prompt_logprobs) for o in scored],
                     "weight_bytes": model.backend.weight_bytes,
                     "describe": model.backend.describe()})


def quantized_models_rank(rank: int, n: int, tmp: Path, cases: list[dict]) -> None:
    """Per case (name, path, weights mode, cache dir): this rank's backend on its slices of the
    quantized checkpoint beside the single-process backend of the same checkpoint: logits of a
    prompt's every position, greedy tokens of two users decoding together, what it read."""
    mesh = Mesh.from_env(n, "cpu")[0]
    runtime = RuntimeConfig(device="cpu", max_batch=2, max_seq_len=32, block_size=8)
    results = {}
    for case in cases:
        slices = open_slices_as(case["path"], case["weights"], cache_dir=case["cache"],
                                progress=False)
        reader = type(slices).__name__
        if isinstance(slices, QuantizingSlices):
            slices = slices.across(mesh)  # int8 row scales agreed over the ranks
        counting = CountingSlices(slices)
        single = load_checkpoint(case["path"], cache_dir=tmp / f"single{rank}", progress=False,
                                 weights=case["weights"])
        backends = [TorchBackend(counting, runtime, mesh=mesh), TorchBackend(single, runtime)]
        g = torch.Generator().manual_seed(5)
        tokens = torch.randint(0, single.config.vocab_size, (9,), generator=g)
        pages = torch.arange(1, 1 + runtime.blocks_per_seq)
        logits = [b.model.gather_logits(b.model.prefill(tokens, 0, pages, b.cache,
                                                        all_logits=True)) for b in backends]
        prompts = [torch.randint(0, single.config.vocab_size, (k,), generator=g).tolist()
                   for k in (6, 11)]
        greedy = [SequenceSampling(SamplingParams(), 0)] * 2
        results[case["name"]] = {
            "reader": reader, "logits": logits, "prompt": tokens, "prompts": prompts,
            "tokens": [decode_together(b, prompts, 8, greedy) for b in backends],
            "quantized_bytes": counting.quantized_bytes,
            "formats": {k: (t.format, t.nbytes) for k, t in single.tensors.items()
                        if isinstance(t, QuantizedTensor)},
            "local": backends[0].model.local}
        for b in backends:
            b.close()
        slices.close()
    # last (closing it leaves the process group): the launch a user gets, LLM(tensor_parallel=n,
    # weights=...) without the tokenizer, on the last case
    case = cases[-1]
    spec = BackendSpec(model=case["path"], tensor_parallel=n, weights=case["weights"],
                       max_batch=2, max_seq_len=32, block_size=8, progress=False,
                       cache_dir=case["cache"])
    backend = create_backend("torch", spec)
    own = backend.backend  # this rank's TorchBackend: every rank runs the same prefill
    pages = torch.arange(1, 1 + own.runtime.blocks_per_seq)
    launched = {"logits": own.model.gather_logits(own.model.prefill(
        results[case["name"]]["prompt"], 0, pages, own.cache, all_logits=True))}
    if backend.leader:
        prompts = results[case["name"]]["prompts"]
        launched["tokens"] = decode_together(backend, prompts, 8, [SequenceSampling(
            SamplingParams(), 0)] * 2)
        results["launched"] = launched
        backend.close()
    else:
        backend.follow()
    save(tmp, rank, results)
