"""Tensor parallelism on the torch backend: the split plan, per-rank weight slices, and 2 / 4
gloo processes on the CPU against the single-process model (modules in fp32: PCC >= 0.9999 and
assert_close, hf_reference.FP32_CLOSE; equal greedy and seeded-sampled tokens, about 1/N of the
sharded weights per rank).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from hf_reference import assert_matches, fp32
from server_process import free_port, wait_healthy
from tp_ranks import (
    default_model_rank,
    mismatched_settings_rank,
    scored_params,
    small_model_rank,
    spawn_ranks,
)

import llm
from llm.backends.torch.parallel.plan import TensorParallelPlan
from llm.model.checkpoint.common import expected_tensors
from llm.model.checkpoint.hf import save_hf_checkpoint
from llm.model.checkpoint.load import load_checkpoint
from llm.model.config import ConfigError, ModelConfig

REPO = Path(__file__).resolve().parents[2]
_BASE = dict(arch="llama", hidden_size=64, intermediate_size=160, num_layers=2,
             head_dim=16, max_position_embeddings=256, eos_token_ids=(2,))
# 9 query / 3 KV heads (groups cut by rank boundaries), a vocabulary that does not divide, tied;
# 8 / 2 heads (KV heads replicated at 4 ranks) with every bias, untied; Qwen3's q/k head norms
# (replicated on every rank).
CONFIGS = {
    "odd_heads_tied": ModelConfig(**_BASE, vocab_size=321, num_heads=9, num_kv_heads=3,
                                  tie_word_embeddings=True),
    "gqa_all_bias": ModelConfig(**_BASE, vocab_size=320, num_heads=8, num_kv_heads=2,
                                qkv_bias=True, o_bias=True, mlp_bias=True),
    "qwen3_qk_norm": ModelConfig(**{**_BASE, "arch": "qwen3"}, vocab_size=320, num_heads=8,
                                 num_kv_heads=2, qk_norm=True),
}


def random_model_dir(tmp: Path, config: ModelConfig) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in expected_tensors(config).items():
        base = 1.0 if name.endswith("norm.weight") else 0.0
        tensors[name] = base + 0.1 * torch.randn(shape, generator=g)
    save_hf_checkpoint(tmp, config, tensors, shard_size_bytes=60_000)  # several shard files
    return tmp


# ---------------------------------------------------------------- the plan (no processes)
def test_plan_splits_heads_kv_heads_ffn_and_vocab() -> None:
    c = CONFIGS["odd_heads_tied"]
    two = [TensorParallelPlan(c, 2).shard(r) for r in range(2)]
    assert [s.heads for s in two] == [(0, 4), (4, 9)]
    assert [s.kv_heads for s in two] == [(0, 0, 0, 1), (1, 1, 2, 2, 2)]  # group 1 cut: replicated
    assert [s.vocab for s in two] == [(0, 160), (160, 321)]
    four = [TensorParallelPlan(c, 4).shard(r) for r in range(4)]
    assert [s.heads for s in four] == [(0, 2), (2, 4), (4, 6), (6, 9)]
    assert [s.kv_heads for s in four] == [(0,), (0, 1), (1,), (2,)]
    assert [s.ffn for s in four] == [(0, 40), (40, 80), (80, 120), (120, 160)]
    g = [TensorParallelPlan(CONFIGS["gqa_all_bias"], 4).shard(r).kv_heads for r in range(4)]
    assert g == [(0,), (0,), (1,), (1,)]  # 4 ranks > 2 KV heads: each KV head on two ranks
    local = TensorParallelPlan(c, 2).local_config(1)
    assert (local.num_heads, local.num_kv_heads, local.head_dim) == (5, 5, 16)


def test_plan_errors_name_the_limit() -> None:
    c = CONFIGS["odd_heads_tied"]
    with pytest.raises(ConfigError, match="tensor_parallel=10 exceeds the model's num_heads"):
        TensorParallelPlan(c, 10)
    for bad in (0, -2, True, 2.0):
        with pytest.raises(ConfigError, match="positive integer"):
            TensorParallelPlan(c, bad)


def test_wrong_launch_is_a_clear_error_before_loading(tmp_path) -> None:
    cmd = [sys.executable, str(REPO / "demos" / "generate.py"), "--tp", "2", "--model",
           str(tmp_path / "missing"), "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "tensor_parallel=2 needs 2 processes, but this one was started as one of 1" in r.stderr
    with pytest.raises(ConfigError, match="device 'cpu' or 'cuda'"):
        llm.LLM(tensor_parallel=2, device="cuda:1")


def test_one_of_several_processes_without_tp_is_refused(monkeypatch) -> None:
    """`torchrun --nproc-per-node 2 generate.py --tp 1` ran two full copies that each printed
    (and would each serve): refused before loading, naming the fix."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"tensor_parallel=1, but this process was started as "
                                          r"one of 2 .*--tp 2"):
        llm.LLM(max_seq_len=64, progress=False)


def test_ranks_given_different_settings_all_refuse(tmp_path) -> None:
    """A rank built with other weights used to wait in a collective its peer never reached (a
    hang) or compute wrong text: every rank now raises, naming the setting and each value."""
    errors = spawn_ranks(mismatched_settings_rank, 2, tmp_path)
    for e in errors:
        assert e is not None and "the tensor-parallel ranks were given different settings: " \
            "weights: rank 0 'stored', rank 1 'dequantize'" in e


# ---------------------------------------------------------------- 2 and 4 gloo processes
@pytest.mark.parametrize("name,ranks", [(name, r) for name in CONFIGS for r in (2, 4)]
                         + [("odd_heads_tied", 1)])  # 1: one rank, the collective paths
def test_small_model_sharded_equals_unsharded(tmp_path, name: str, ranks: int) -> None:
    model_dir = random_model_dir(tmp_path / "model", CONFIGS[name])
    out = spawn_ranks(small_model_rank, ranks, tmp_path, str(model_dir))
    for r, res in enumerate(out):
        for module, (sharded, whole) in res["pcc"].items():
            assert sharded.shape == whole.shape, module
            assert_matches(sharded, whole, fp32(0.9999), (r, module))
        sharded_tokens, single_tokens = res["tokens"]
        assert sharded_tokens == single_tokens  # greedy users and a seeded sampled one
        sharded_tokens, single_tokens = res["tokens_full"]
        assert sharded_tokens == single_tokens  # the same with a penalized user in the batch
        if res["greedy"] is not None:  # distributed greedy through the split Triton argmax
            for got, want in res["greedy"]:  # LM head logits; crafted ties and NaN across ranks
                assert torch.equal(got, want), (got, want)
    full = out[0]["full_bytes"]
    for r, res in enumerate(out):  # exactly the plan's slices, read and nothing more
        assert res["weight_bytes"] == res["bytes_read"] == planned_bytes(CONFIGS[name], ranks, r)
        # about 1/N: over only by KV heads replicated where groups are cut (9 heads = 4 + 5)
        assert res["weight_bytes"] <= 1.3 * full / ranks


def planned_bytes(config: ModelConfig, ranks: int, rank: int) -> int:
    """fp32 bytes of one rank's tensors by the plan's local config (biases after the all-reduce
    on rank 0 only; a tied head counted once).
    """
    local = TensorParallelPlan(config, ranks).local_config(rank)
    shapes = expected_tensors(local)
    return sum(4 * torch.Size(s).numel() for k, s in shapes.items()
               if rank == 0 or not k.endswith(("o_proj.bias", "down_proj.bias")))


PROMPTS = ["Once upon a time", "The capital of France is"]
STEPS = 16


@pytest.fixture(scope="module")
def single_process() -> tuple[list[list[int]], int, list[str]]:
    """Greedy tokens and texts of PROMPTS in one process, and the model's weight bytes."""
    model = llm.LLM(max_batch=2, max_seq_len=128, progress=False)
    out = model.generate(PROMPTS, llm.SamplingParams(max_new_tokens=STEPS, ignore_eos=True))
    checkpoint = load_checkpoint(model.backend.source, progress=False)
    full = sum(t.numel() * t.element_size() for t in checkpoint.tensors.values())
    scored = model.generate(PROMPTS, scored_params(STEPS))
    stored = model.backend.weight_bytes  # weights="auto" on the CPU: the GGUF's blocks as stored
    return [o.token_ids for o in out], full, [o.text for o in out], scored, stored


@pytest.mark.parametrize("ranks,weights", [(2, "auto"), (4, "auto"), (2, "dequantize")])
def test_default_model_greedy_equals_single_process(tmp_path, single_process,
                                                     ranks: int, weights: str) -> None:
    """auto (on the CPU: stored): each rank's Q4_1 / Q8_0 blocks as stored, as the single process
    runs them; dequantize: float32 slices on every rank."""
    tokens, full, _, scored, stored = single_process
    out = spawn_ranks(default_model_rank, ranks, tmp_path, PROMPTS, STEPS, weights)
    assert out[0]["tokens"] == tokens
    for (got_tokens, got_lps, got_prompt), want in zip(out[0]["scored"], scored, strict=True):
        assert got_tokens == want.token_ids  # penalties and logprobs over the gathered vocab
        assert got_prompt[0] is None and len(got_prompt) == len(want.prompt_logprobs)
        pairs = list(zip(got_lps, want.logprobs, strict=True)) + list(
            zip(got_prompt[1:], want.prompt_logprobs[1:], strict=True))
        for g, w in pairs:
            assert g.token == w.token and g.logprob == pytest.approx(w.logprob, abs=1e-3)
            assert len(g.top) == len(w.top)
    assert f"tensor parallel over {ranks} ranks" in out[0]["describe"]
    assert (f"not supported by the torch (tensor parallel over {ranks} ranks) backend"
            in out[0]["refusal"])
    # per generate: 2 prefills + STEPS - 1 decodes
    assert all(res["calls"] == 2 * (STEPS + 1) for res in out[1:])
    for res in out:  # about 1/N of the dense or of the stored bytes
        assert res["weight_bytes"] <= 1.15 * (full if weights == "dequantize" else stored) / ranks


def test_server_over_two_ranks_answers_like_one_process(single_process) -> None:
    """`torchrun --nproc-per-node 2 -m llm.serve --tp 2`: rank 0 serves, rank 1 follows; a
    greedy completion equals the one-process text, and stopping torchrun stops both ranks."""
    pytest.importorskip("starlette", reason="the server's dependencies: pip install -e '.[serve]'")
    port, master = free_port(), free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(master), "-m", "llm.serve", "--tp", "2", "--port", str(port),
           "--max-batch", "2", "--max-seq-len", "128", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, 180)
        body = {"model": "SmolLM2-135M-Instruct", "prompt": PROMPTS[0], "max_tokens": STEPS,
                "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == single_process[2][0]
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    left = subprocess.run(["pgrep", "-f", f"llm.serve --tp 2 --port {port}"], capture_output=True)
    assert left.returncode == 1, left.stdout  # no rank left behind

