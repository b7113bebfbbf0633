"""CPU intra-op threads (issue 19): the usable cores from affinity and the cgroup quota, the
per-phase ThreadPolicy, the runner applying it around each call, the `threads` option refused on
bad values, and greedy tokens that do not depend on the thread count.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_reference import SMALL_CONFIGS, hf_model, state_dict

from llm.backends.torch import threads as threads_mod
from llm.backends.torch.runner import TorchBackend, create
from llm.backends.torch.threads import (
    ThreadPolicy,
    cgroup_cpu_limit,
    intra_op_threads,
    usable_cores,
)
from llm.engine.contract.backend import BackendSpec, SequenceSampling
from llm.engine.contract.sampling_params import SamplingParams
from llm.engine.drive import decode_together
from llm.model.checkpoint.common import Checkpoint
from llm.model.config import ConfigError, RuntimeConfig


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("files, limit", [
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "400000 100000\n"}, 4.0),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu,cpuacct/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
     0.5),
    ({"cpu.cfs_quota_us": "300000\n", "cpu.cfs_period_us": "100000\n"}, 3.0),
    ({}, None),
    ({"cpu.max": "garbage\n"}, None),
])
def test_cgroup_cpu_limit_parses_v1_and_v2(tmp_path: Path, files: dict[str, str],
                                           limit: float | None) -> None:
    assert cgroup_cpu_limit(_write(tmp_path, files)) == limit


@pytest.mark.parametrize("affinity, files, cores", [
    (8, {"cpu.max": "250000 100000"}, 2),  # quota 2.5 CPUs, rounded down
    (2, {"cpu.max": "800000 100000"}, 2),  # the affinity mask is smaller
    (4, {"cpu.max": "max 100000"}, 4),  # no quota
    (4, {"cpu.max": "50000 100000"}, 1),  # half a CPU: still one thread
    (6, {"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"}, 3),
])
def test_usable_cores_is_affinity_capped_by_quota(tmp_path: Path, monkeypatch, affinity: int,
                                                  files: dict[str, str], cores: int) -> None:
    monkeypatch.setattr(threads_mod.os, "sched_getaffinity", lambda pid: set(range(affinity)))
    assert usable_cores(_write(tmp_path, files)) == cores


@pytest.mark.parametrize(("cores", "others", "phase", "batch", "want"), [
    (2, 0, "decode", 1, 1), (2, 0, "decode", 3, 1),  # small decode batches: one thread
    (2, 0, "decode", 4, 2), (2, 0, "prefill", 1, 2),  # idle machine: every core
    (2, 1, "decode", 8, 1), (2, 1, "prefill", 1, 1),  # one busy process: give it its core
    (8, 3, "decode", 16, 5), (8, 9, "prefill", 1, 1),  # the free cores, at least one
    (1, 0, "decode", 16, 1),
])
def test_default_policy_uses_the_free_cores(monkeypatch, cores, others, phase, batch,
                                            want) -> None:
    monkeypatch.setattr(threads_mod, "competing_tasks", lambda: others)
    assert ThreadPolicy.default(cores).count(phase, batch) == want
    fixed = ThreadPolicy.fixed(3)
    assert fixed == ThreadPolicy(prefill=3, decode=3) and fixed.count(phase, batch) == 3


def test_the_competition_is_read_at_most_every_ttl(monkeypatch) -> None:
    """Steps in quick succession reuse one reading of /proc; a later step reads it again."""
    readings = iter([0, 1])
    calls = []
    monkeypatch.setattr(threads_mod, "competing_tasks", lambda: calls.append(1) or next(readings))
    now = [50.0]
    monkeypatch.setattr(threads_mod.time, "monotonic", lambda: now[0])
    policy = ThreadPolicy.default(2)
    assert [policy.count("prefill") for _ in range(5)] == [2] * 5 and len(calls) == 1
    now[0] += threads_mod.COMPETITION_TTL_S + 0.01
    assert policy.count("prefill") == 1 and len(calls) == 2  # a busy process appeared


def test_competing_tasks_subtracts_this_process_running_threads(tmp_path: Path) -> None:
    load = tmp_path / "loadavg"
    load.write_text("0.50 0.40 0.30 3/412 9999\n")
    tasks = tmp_path / "task"
    for tid, state in ((1, "R"), (2, "S"), (3, "R")):
        (tasks / str(tid)).mkdir(parents=True)
        (tasks / str(tid) / "stat").write_text(f"{tid} (py thread (x)) {state} 1 2 3\n")
    assert threads_mod.competing_tasks(load, tasks) == 1  # 3 running, 2 of them ours
    load.write_text("garbage")
    assert threads_mod.competing_tasks(load, tasks) == 0
    assert threads_mod.competing_tasks() >= 0  # the real /proc of this machine


@pytest.mark.parametrize("bad", [0, -2, 1.5, "2", True, None])
def test_bad_thread_counts_are_refused(bad) -> None:
    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        ThreadPolicy.fixed(bad)


def _small(threads: int | None = None, device: str = "cpu") -> TorchBackend:
    config = SMALL_CONFIGS["llama_gqa"]
    return TorchBackend(Checkpoint(config, state_dict(hf_model(config)), source=None),
                        RuntimeConfig(device=device, max_batch=2, max_seq_len=64, block_size=8),
                        threads=threads)


@pytest.mark.parametrize("bad", [0, -1, 2.0, "4", False])
def test_create_refuses_bad_threads_option(bad) -> None:
    config = SMALL_CONFIGS["llama_gqa"]
    spec = BackendSpec(Checkpoint(config, state_dict(hf_model(config)), source=None), max_batch=2,
                       max_seq_len=64, block_size=8, options={"threads": bad})
    with pytest.raises(ConfigError, match=r"torch backend option threads must be an integer >= 1"):
        create(spec)


def test_threads_option_is_refused_off_the_cpu() -> None:
    with pytest.raises(ValueError, match="threads applies to the CPU device only"):
        _small(threads=2, device="cuda")


def test_runner_applies_the_policy_per_phase_and_restores() -> None:
    backend = _small()
    backend.threads = ThreadPolicy(prefill=2, decode=1)
    seen: list[tuple[str, int]] = []
    for phase in ("prefill", "decode"):
        inner = getattr(backend.model, phase)

        def wrapped(*args, _inner=inner, _phase=phase, **kwargs):
            seen.append((_phase, torch.get_num_threads()))
            return _inner(*args, **kwargs)

        setattr(backend.model, phase, wrapped)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        greedy = [SequenceSampling(SamplingParams(), 0)] * 2
        decode_together(backend, [[5, 6, 7], [8, 9]], 4, greedy)
        assert torch.get_num_threads() == 3  # restored after every call
    finally:
        torch.set_num_threads(before)
    assert {p for p, _ in seen} == {"prefill", "decode"}
    assert all(n == (2 if p == "prefill" else 1) for p, n in seen), seen
    assert "CPU threads: prefill 2, decode 1" in backend.describe()


def test_fixed_threads_override_both_phases() -> None:
    backend = _small(threads=2)
    assert backend.threads == ThreadPolicy(prefill=2, decode=2)
    assert "2 CPU threads" in backend.describe()


def test_intra_op_threads_restores_on_error() -> None:
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    with pytest.raises(RuntimeError, match="boom"), intra_op_threads(want):
        assert torch.get_num_threads() == want
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_greedy_tokens_equal_with_one_and_two_threads() -> None:
    g = torch.Generator().manual_seed(3)
    vocab = SMALL_CONFIGS["llama_gqa"].vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (40, 9)]
    greedy = [SequenceSampling(SamplingParams(), 0)] * 2
    one, two = (decode_together(_small(threads=n), prompts, 24, greedy) for n in (1, 2))
    assert len(one[0]) == 24 and one == two
