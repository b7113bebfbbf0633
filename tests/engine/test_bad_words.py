"""bad_words' token sequences and masks (llm.engine.bad_words), on a stand-in tokenizer; the
end-to-end behaviour (the output never holds a banned word) is in tests/serve."""

from __future__ import annotations

import numpy as np
import pytest

from llm.engine.bad_words import BadWords, banned_sequences
from llm.engine.contract.sampling_params import SamplingParams, SamplingParamsError
from llm.engine.grammar import GrammarError

VOCAB = {"cat": [7], " cat": [8], "hot dog": [3, 4], " hot dog": [5, 4], "ox": [9, 10],
         " ox": [9, 10], "a b c": [1, 2, 6], " a b c": [11, 2, 6]}


class Tokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert not add_special_tokens
        return VOCAB[text]


def _allowed(bw: BadWords, words: int = 1) -> set[int]:
    row = np.zeros(words, dtype=np.int32)
    bw.fill(row)
    bits = row.view(np.uint32)
    return {t for t in range(32 * words) if bits[t // 32] >> (t % 32) & 1}


def test_each_word_alone_and_after_a_space() -> None:
    seqs = banned_sequences(Tokenizer(), ["cat", " hot dog", "ox", "a b c"])
    # " ox" encodes as "ox" does: one sequence; the others twice (alone and after a space)
    assert seqs == ((7,), (8,), (3, 4), (5, 4), (9, 10), (1, 2, 6), (11, 2, 6))


def test_the_last_token_is_masked_where_the_output_ends_with_the_rest() -> None:
    bw = BadWords(((7,), (3, 4), (1, 2, 6)))
    assert _allowed(bw) == set(range(32)) - {7}  # one-token words: always
    bw.consume(3)
    assert _allowed(bw) == set(range(32)) - {7, 4}
    bw.consume(5)  # the sequence broken: 4 free again
    assert _allowed(bw) == set(range(32)) - {7}
    bw.consume(1)
    bw.consume(2)
    assert _allowed(bw) == set(range(32)) - {7, 6}
    with pytest.raises(GrammarError, match="bad_words") as e:
        bw.consume(6)  # a backend that did not apply the mask
    assert e.value.param == "bad_words"
    assert not bw.stopped


def test_a_grammar_mask_is_narrowed() -> None:
    class Grammar:
        stopped = False
        taken: list[int] = []

        def fill(self, row: np.ndarray) -> None:
            row[:] = 0
            row.view(np.uint32)[0] = 0b1111_0000  # tokens 4..7

        def consume(self, token: int) -> None:
            self.taken.append(token)

    grammar = Grammar()
    bw = BadWords(((7,), (3, 4)), grammar)
    assert _allowed(bw, 2) == {4, 5, 6}
    bw.consume(3)
    assert _allowed(bw, 2) == {5, 6} and grammar.taken == [3]


@pytest.mark.parametrize("bad", [[""], ["  "], [3], b"x"])
def test_bad_values_are_refused_by_name(bad) -> None:
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(bad_words=bad)
    assert e.value.param == "bad_words"


def test_the_scheduler_keeps_producible_sequences_and_refuses_an_empty_choice(
        monkeypatch) -> None:
    """Sequences with an id past the model's vocabulary cannot be produced (a mask row has no bit
    for them): dropped. allowed_token_ids that bad_words bans entirely leave nothing: refused."""
    from fakes import VOCAB as FAKE_VOCAB
    from fakes import fake_parts

    from llm.engine import scheduler as sched_mod

    backend, tok, pages = fake_parts()
    sched = sched_mod.Scheduler(backend, tok, pages)
    monkeypatch.setattr(sched_mod, "banned_sequences",
                        lambda t, words: ((7,), (FAKE_VOCAB + 3,), (5, FAKE_VOCAB)))
    assert sched._banned(SamplingParams(bad_words=["w"]), set(), "") == ((7,),)
    with pytest.raises(SamplingParamsError, match="bad_words bans") as e:
        sched._banned(SamplingParams(bad_words=["w"], allowed_token_ids=[7]), set(), "")
    assert e.value.param == "bad_words"
