"""The tensor-parallel leader and its followers make the same calls: a follower replays the
leader's prefill_step as prefill_step (a chunk that selects nothing stays one that selects
nothing on every rank, so the ranks' collectives stay in step), and the leader's prefill asks
every rank for a token."""

from __future__ import annotations

from fakes import fake_parts

from llm.backends.torch.parallel.leader import LeaderBackend, follow
from llm.engine.contract.backend import PrefillInput, SequenceSampling
from llm.engine.contract.outputs import StepOutput
from llm.engine.contract.sampling_params import SamplingParams

GREEDY = SequenceSampling(SamplingParams(), 0)


class Recorder:
    """A channel whose broadcasts are kept, to be replayed to a follower."""

    size = 2

    def __init__(self, sent: list | None = None) -> None:
        self.sent = [] if sent is None else sent

    def broadcast_object(self, obj=None):
        if obj is not None:
            self.sent.append(obj)
            return obj
        return self.sent.pop(0)


def _recording_backend(calls: list):
    backend = fake_parts()[0]
    step = backend.prefill_step

    def prefill_step(inp: PrefillInput, launched=None) -> StepOutput:
        calls.append(("prefill_step", inp.select))
        out = step(inp, launched)
        return out if inp.select else StepOutput(())
    backend.prefill_step = prefill_step
    return backend


def test_followers_replay_the_leaders_prefill_calls() -> None:
    leader_calls, follower_calls = [], []
    channel = Recorder()
    leader = LeaderBackend(_recording_backend(leader_calls), channel)
    launched: list[int] = []
    assert leader.prefill_step(PrefillInput(0, [1, 2], 0, [1], GREEDY, select=False),
                               lambda: launched.append(1)).tokens == ()
    assert len(leader.prefill_step(PrefillInput(0, [3], 2, [1], GREEDY)).tokens) == 1
    assert launched == [1]  # the leader's own backend calls it; the broadcast holds inputs only
    assert all(isinstance(inp, PrefillInput) for _, inp in channel.sent)
    leader.prefill(PrefillInput(1, [4], 0, [2], GREEDY, select=False))  # prefill: a token
    leader.close()
    assert follow(_recording_backend(follower_calls), Recorder(channel.sent)) == 3
    assert follower_calls == [("prefill_step", False), ("prefill_step", True),
                              ("prefill_step", True)]
    assert leader_calls[:2] == follower_calls[:2]
