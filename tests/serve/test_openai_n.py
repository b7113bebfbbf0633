"""n > 1 and best_of with the official openai client: n choices (index 0..n-1) in whole and
streamed responses of /v1/completions and /v1/chat/completions, usage over every choice, seeded
choices distinct and reproducible, best_of's choice the most likely of the sampled ones, and
clear 400s for what cannot be served; every slot and page free after.
"""

from __future__ import annotations

import collections

import openai
import pytest
from conftest import MAX_BATCH, MODEL_NAME

PROMPT = "Once upon a time, in a small village,"
CHAT = [{"role": "user", "content": "Name a fruit."}]


def _streamed(chunks) -> tuple[dict[int, str], dict[int, str], object]:
    """(text by choice index, finish_reason by index, usage) of a streamed response."""
    texts, finish, usage = collections.defaultdict(str), {}, None
    for c in chunks:
        usage = c.usage or usage
        for ch in c.choices:
            piece = ch.text if hasattr(ch, "text") else (ch.delta.content or "")
            texts[ch.index] += piece
            if ch.finish_reason is not None:
                assert ch.index not in finish  # one finish per choice
                finish[ch.index] = ch.finish_reason
    return dict(texts), finish, usage


def test_completions_n_whole_and_streamed(client, live_server) -> None:
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=5, n=3)
    r = client.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.text for c in r.choices]
    assert len(set(texts)) == 3  # distinct samples
    assert client.completions.create(**kw).choices[1].text == texts[1]  # reproducible
    assert r.usage.completion_tokens == 30 and r.usage.total_tokens == r.usage.prompt_tokens + 30
    one = client.completions.create(**{**kw, "n": 1})
    assert one.choices[0].text == texts[0]  # choice 0 keeps the request's seed
    s_texts, finish, usage = _streamed(client.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}))
    assert s_texts == dict(enumerate(texts)) and finish == {0: "length", 1: "length", 2: "length"}
    assert usage.completion_tokens == 30
    assert live_server.wait_all_free()


def test_chat_n_whole_and_streamed(client, live_server) -> None:
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=8,
                                       temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content == r.choices[1].message.content  # greedy: the same
    single = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=8,
                                            temperature=0)
    assert single.choices[0].message.content == r.choices[0].message.content
    assert r.usage.completion_tokens == 2 * single.usage.completion_tokens
    texts, finish, _ = _streamed(client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=8, temperature=0, n=2, stream=True))
    assert texts == {0: r.choices[0].message.content, 1: r.choices[1].message.content}
    assert set(finish) == {0, 1}
    assert live_server.wait_all_free()


def test_best_of_returns_the_most_likely_sample(client, live_server) -> None:
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=3)
    every = client.completions.create(**kw, n=4, logprobs=0)
    scores = [sum(c.logprobs.token_logprobs) for c in every.choices]
    best = client.completions.create(**kw, n=1, best_of=4)
    assert len(best.choices) == 1 and best.choices[0].index == 0
    assert best.choices[0].text == every.choices[scores.index(max(scores))].text
    assert best.choices[0].logprobs is None  # not asked for
    two = client.completions.create(**kw, n=2, best_of=4, logprobs=0)
    ranked = sorted(range(4), key=lambda i: -scores[i])[:2]
    assert [c.text for c in two.choices] == [every.choices[i].text for i in ranked]
    assert live_server.wait_all_free()


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"n": 0}, "n"), ({"n": MAX_BATCH + 1}, "n"), ({"best_of": 1, "n": 2}, "best_of"),
    ({"best_of": 3, "stream": True}, "best_of"), ({"best_of": 0}, "best_of"),
])
def test_what_cannot_be_served_is_a_400_naming_it(client, live_server, kwargs, param) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, **kwargs)
    assert e.value.body["param"] == param, e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=4,
                                       extra_body={"best_of": 2})
    assert e.value.body["param"] == "best_of"
    assert live_server.wait_all_free()
