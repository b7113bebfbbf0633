"""Logprobs, echo, penalties, logit_bias and min_tokens with the official `openai` client against
the live server: OpenAI's shapes whole and streamed, the same values as the in-process Python API,
and a clear 400 naming the parameter for every malformed value, with nothing left held after.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import MODEL_NAME

from llm.engine.contract.sampling_params import SamplingParams

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def reference(serve_model):
    """The Python API's greedy result with logprobs and prompt logprobs (3 alternatives)."""
    return serve_model.generate([PROMPT], SamplingParams(max_new_tokens=8, logprobs=3,
                                                         prompt_logprobs=3))[0]


def _text(serve_model, token: int) -> str:
    return serve_model.tokenizer.decode([token], skip_special_tokens=False)


def _check_completion_logprobs(lp, entries, serve_model) -> None:
    """An OpenAI completions logprobs object against the Python API's TokenLogprobs."""
    assert lp.tokens == [_text(serve_model, e.token) if e else lp.tokens[0] for e in entries]
    offsets = [0]
    for t in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp.text_offset == [lp.text_offset[0] + o for o in offsets]
    for got, top, e in zip(lp.token_logprobs, lp.top_logprobs, entries, strict=True):
        if e is None:
            assert got is None and top is None
            continue
        assert got == pytest.approx(e.logprob, abs=1e-3)
        want_top = {_text(serve_model, t): v for t, v in e.top}
        want_top.setdefault(_text(serve_model, e.token), e.logprob)
        assert set(top) == set(want_top)
        assert [top[k] for k in want_top] == pytest.approx(list(want_top.values()), abs=1e-3)


def test_completion_logprobs_whole_and_streamed(client, reference, serve_model) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                  logprobs=3)
    choice = r.choices[0]
    assert choice.text == reference.text == "".join(choice.logprobs.tokens)
    assert choice.logprobs.text_offset[0] == 0
    _check_completion_logprobs(choice.logprobs, reference.logprobs, serve_model)
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8,
                                            temperature=0, logprobs=3, stream=True))
    with_lp = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert len(with_lp) > 3  # per chunk, not all at the end
    assert [t for lp in with_lp for t in lp.tokens] == choice.logprobs.tokens
    assert [o for lp in with_lp for o in lp.text_offset] == choice.logprobs.text_offset
    assert [v for lp in with_lp for v in lp.token_logprobs] == choice.logprobs.token_logprobs


def test_completion_echo_with_prompt_logprobs(client, reference, serve_model) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                  logprobs=3, echo=True)
    choice = r.choices[0]
    assert choice.text == PROMPT + reference.text
    entries = reference.prompt_logprobs + reference.logprobs
    assert choice.logprobs.token_logprobs[0] is None
    assert len(choice.logprobs.tokens) == len(entries) == r.usage.total_tokens
    assert choice.logprobs.tokens[0] == _text(serve_model, reference.prompt_token_ids[0])
    _check_completion_logprobs(choice.logprobs, entries, serve_model)
    plain = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8,
                                      temperature=0, echo=True)
    assert plain.choices[0].text == choice.text and plain.choices[0].logprobs is None
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8,
                                            temperature=0, logprobs=3, echo=True, stream=True))
    assert chunks[0].choices[0].text == PROMPT
    assert chunks[0].choices[0].logprobs.token_logprobs[0] is None
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == choice.logprobs.tokens


def _check_prompt_logprobs(got, entries, serve_model, k: int) -> None:
    """vLLM's prompt_logprobs (a list of {token id: {logprob, rank, decoded_token}}) against the
    Python API's prompt TokenLogprobs (None first): the prompt token first, with its rank, or
    its place among the k best where it is one of them (as vLLM's)."""
    assert len(got) == len(entries) and got[0] is None and entries[0] is None
    for d, e in zip(got[1:], entries[1:], strict=True):
        assert next(iter(d)) == str(e.token)  # the prompt token first
        own = d[str(e.token)]
        assert own["logprob"] == pytest.approx(e.logprob, abs=1e-3)
        assert own["decoded_token"] == _text(serve_model, e.token) and e.rank >= 1
        top = e.top[:k]
        assert len(d) == len(top) + (e.token not in dict(top))
        places = {t: rank for rank, (t, _) in enumerate(top, 1)}
        assert own["rank"] == places.get(e.token, e.rank)
        for rank, (t, v) in enumerate(top, 1):
            assert d[str(t)] == {"logprob": pytest.approx(v, abs=1e-3), "rank": rank,
                                 "decoded_token": _text(serve_model, t)}


def choice_k(client, k: int) -> list:
    return client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2,
                                     temperature=0,
                                     extra_body={"prompt_logprobs": k}).choices[0].prompt_logprobs


def test_prompt_logprobs_in_vllms_shape(client, reference, serve_model, live_server) -> None:
    """vLLM's prompt_logprobs extension: in each completion choice and in the chat response,
    the Python API's values; alone or beside echo's logprobs (each with its own count); not
    streamed (a 400 naming it)."""
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body={"prompt_logprobs": 3})
    choice = r.choices[0]
    assert choice.text == reference.text and choice.logprobs is None
    _check_prompt_logprobs(choice.prompt_logprobs, reference.prompt_logprobs, serve_model, 3)
    both = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8,
                                     temperature=0, logprobs=1, echo=True,
                                     extra_body={"prompt_logprobs": 3}).choices[0]
    _check_prompt_logprobs(both.prompt_logprobs, reference.prompt_logprobs, serve_model, 3)
    assert all(t is None or len(t) <= 2 for t in both.logprobs.top_logprobs)  # echo's own 1
    fewer = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2,
                                      temperature=0, logprobs=3, echo=True,
                                      extra_body={"prompt_logprobs": 0}).choices[0]
    _check_prompt_logprobs(fewer.prompt_logprobs, reference.prompt_logprobs, serve_model, 0)
    n = len(reference.prompt_logprobs)
    assert [len(t) for t in fewer.logprobs.top_logprobs[1:n]] == [
        len({*dict(e.top), e.token}) for e in reference.prompt_logprobs[1:]]
    ids = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2, temperature=0,
                                    extra_body={"prompt_logprobs": 2,
                                                "return_tokens_as_token_ids": True}).choices[0]
    _check_prompt_logprobs(ids.prompt_logprobs, reference.prompt_logprobs, serve_model, 2)
    assert ids.prompt_logprobs == choice_k(client, 2)  # as vLLM: only the keys name ids
    many = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, n=2,
                                     temperature=1.0, seed=3, extra_body={"prompt_logprobs": 1})
    assert [c.prompt_logprobs for c in many.choices] == [many.choices[0].prompt_logprobs] * 2
    _check_prompt_logprobs(many.choices[0].prompt_logprobs, reference.prompt_logprobs,
                           serve_model, 1)
    want = serve_model.chat(CHAT, SamplingParams(max_new_tokens=4, prompt_logprobs=2))
    chat = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=4,
                                          temperature=0, extra_body={"prompt_logprobs": 2})
    assert chat.choices[0].message.content == want.text
    assert len(chat.prompt_logprobs) == chat.usage.prompt_tokens
    _check_prompt_logprobs(chat.prompt_logprobs, want.prompt_logprobs, serve_model, 2)
    plain = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2,
                                      temperature=0, logprobs=1, echo=True)
    assert "prompt_logprobs" not in plain.choices[0].model_extra  # only where asked
    for path, body in (("/completions", {"prompt": PROMPT}), ("/chat/completions",
                                                               {"messages": CHAT})):
        r = httpx.post(f"{live_server.url}/v1{path}", timeout=60,
                       json={"model": MODEL_NAME, "max_tokens": 2, "stream": True,
                             "prompt_logprobs": 1, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", r.text
        assert "stream" in r.json()["error"]["message"]
    assert live_server.wait_all_free()


def test_chat_logprobs_whole_and_streamed(client, serve_model) -> None:
    want = serve_model.chat(CHAT, SamplingParams(max_new_tokens=10, logprobs=2))
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=10,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert r.choices[0].message.content == want.text
    assert [c.token for c in content] == [_text(serve_model, e.token) for e in want.logprobs]
    for c, e in zip(content, want.logprobs, strict=True):
        assert c.logprob == pytest.approx(e.logprob, abs=1e-3)
        assert bytes(c.bytes).decode() == c.token
        assert [t.token for t in c.top_logprobs] == [_text(serve_model, t) for t, _ in e.top]
        assert [t.logprob for t in c.top_logprobs] == pytest.approx([v for _, v in e.top],
                                                                     abs=1e-3)
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=10,
                                                 temperature=0, logprobs=True, top_logprobs=2,
                                                 stream=True))
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs
                for c in ch.choices[0].logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
    only = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=3,
                                          temperature=0, logprobs=True)
    assert all(c.top_logprobs == [] for c in only.choices[0].logprobs.content)
    none = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=3,
                                          temperature=0)
    assert none.choices[0].logprobs is None


PENALTIES = [
    ({"presence_penalty": 2.0, "frequency_penalty": 2.0}, {}),
    ({"frequency_penalty": -1.0, "temperature": 0.8, "seed": 4}, {}),
    ({"logit_bias": {"42": 100}}, {}),
    ({}, {"repetition_penalty": 1.4}),
    ({"logit_bias": {"2": 100}}, {"min_tokens": 3}),
]


@pytest.mark.parametrize("fields, extra", PENALTIES)
def test_penalties_equal_the_python_api(client, serve_model, fields, extra) -> None:
    """The same greedy (or seeded) tokens as SamplingParams with the same values in-process."""
    prompt = "one, two, one, two, one, two,"
    kwargs = {"temperature": 0, **fields}
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=10,
                                  extra_body=extra, **kwargs)
    bias = {int(k): v for k, v in kwargs.pop("logit_bias", {}).items()}
    want = serve_model.generate([prompt], SamplingParams(max_new_tokens=10, logit_bias=bias,
                                                         **kwargs, **extra))[0]
    assert r.choices[0].text == want.text
    assert r.usage.completion_tokens == len(want.token_ids)
    if "min_tokens" in extra:  # EOS forced by the bias, held off until min_tokens
        assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "stop"
    plain = serve_model.generate([prompt], SamplingParams(max_new_tokens=10,
                                                          temperature=kwargs["temperature"],
                                                          seed=kwargs.get("seed")))[0]
    assert want.token_ids != plain.token_ids  # the parameter changed the result


BAD = {
    "logprobs": [21, -1, "3", 1.5, True],
    "echo": ["yes", 1],
    "presence_penalty": [2.5, -3, "x", [1]],
    "frequency_penalty": [2.01, "0.5", {}],
    "repetition_penalty": [0, -1.0, "x", 1e308, 1e-40],
    "logit_bias": [{"49152": 1}, {"abc": 1}, {"-5": 1}, {"5": 101}, {"5": "a"}, [5], "x",
                   {"5": None}],
    "min_tokens": [-1, 1.5, "2", 9],
    "top_logprobs": [3],
    "prompt_logprobs": [21, -1, "2", 1.5, True],
}
BAD_CHAT = {
    "prompt_logprobs": [21, "1"],
    "logprobs": [3, "true"],
    "top_logprobs": [21, -1, "2", 1.5],
    "echo": [True],
}


def _bad_cases():
    for field, values in BAD.items():
        for v in values:
            yield "/completions", field, v
    for field, values in BAD_CHAT.items():
        for v in values:
            yield "/chat/completions", field, v
    yield "/chat/completions", "top_logprobs", 2  # without logprobs: true


def test_malformed_values_are_400s_naming_the_parameter(live_server) -> None:
    base = {"model": MODEL_NAME, "max_tokens": 8, "temperature": 0}
    for path, field, value in _bad_cases():
        body = {**base, field: value}
        body.update({"messages": CHAT} if path.startswith("/chat") else {"prompt": PROMPT})
        for stream in (False, True):
            r = httpx.post(f"{live_server.url}/v1{path}", json={**body, "stream": stream},
                           timeout=60)
            assert r.status_code == 400, (path, field, value, r.text)
            err = r.json()["error"]
            assert err["param"] == field, (path, field, value, err)
            assert field in err["message"], err
    assert live_server.wait_all_free()


def test_client_gets_bad_request_naming_the_parameter(client, live_server) -> None:
    with pytest.raises(openai.BadRequestError, match="logit_bias") as e:
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2,
                                  logit_bias={"99999": 5})
    assert e.value.body["param"] == "logit_bias"
    with pytest.raises(openai.BadRequestError, match="top_logprobs") as e:
        client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=2,
                                       logprobs=True, top_logprobs=21)
    assert e.value.body["param"] == "top_logprobs"
    assert live_server.wait_all_free()


def test_raw_sse_chunks_of_a_logprobs_stream_are_json_with_finite_values(live_server) -> None:
    """min_tokens masks EOS to -inf: written as a finite number, every chunk valid JSON."""
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 6, "temperature": 0,
            "stream": True, "logprobs": 20, "min_tokens": 6, "logit_bias": {"2": 100}}
    r = httpx.post(live_server.url + "/v1/completions", json=body, timeout=60)
    chunks = [json.loads(line[6:], parse_constant=pytest.fail) for line in r.text.splitlines()
              if line.startswith("data: {")]
    values = [v for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
              for v in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert len(values) == 6
    assert live_server.wait_all_free()


def test_concurrent_requests_answer_as_alone(client, live_server) -> None:
    """Penalized, logprob and plain requests batched together by the server: each answer (text
    and logprobs) is the one it gets alone."""
    variants = [{"logprobs": 2, "presence_penalty": 1.0, "temperature": 0.7, "seed": 1},
                {"logprobs": 0},
                {"frequency_penalty": 1.5, "logit_bias": {"28": -5}},
                {"logprobs": 5, "echo": True, "extra_body": {"repetition_penalty": 1.3}},
                {"temperature": 0.9, "seed": 8, "extra_body": {"min_tokens": 6}},
                {}]

    def ask(kwargs):
        r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10,
                                      **{"temperature": 0, **kwargs})
        lp = r.choices[0].logprobs
        return r.choices[0].text, lp.token_logprobs if lp else None

    alone = [ask(v) for v in variants]
    with ThreadPoolExecutor(len(variants)) as pool:
        together = list(pool.map(ask, variants * 2))
    for (text, lps), (want_text, want_lps) in zip(together, alone * 2):
        assert text == want_text
        assert (lps is None) == (want_lps is None)
        if lps is not None:  # an echoed prompt's first token has None
            assert [v is None for v in lps] == [v is None for v in want_lps]
            assert [v for v in lps if v is not None] == pytest.approx(
                [v for v in want_lps if v is not None], abs=1e-4)
    assert live_server.wait_all_free()


def test_text_offsets_count_from_each_choice_start(client, live_server) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=4,
                                  temperature=1.0, seed=1, n=2, logprobs=1, echo=True)
    for choice in r.choices:
        lp = choice.logprobs
        assert lp.text_offset[0] == 0 and "".join(lp.tokens) == choice.text
    chunks = list(client.completions.create(model=MODEL_NAME, prompt="Once upon a time",
                                            max_tokens=4, temperature=1.0, seed=1, n=2,
                                            logprobs=1, stream=True))
    for index in (0, 1):
        lps = [c.choices[0].logprobs for c in chunks
               if c.choices and c.choices[0].index == index and c.choices[0].logprobs]
        assert [o for lp in lps for o in lp.text_offset][0] == 0
    assert live_server.wait_all_free()


def test_logprobs_stop_with_the_text_at_a_stop_string(client, live_server, serve_model) -> None:
    free = serve_model.generate([PROMPT], SamplingParams(max_new_tokens=12))[0]
    tokens = [_text(serve_model, t) for t in free.token_ids]
    cut = len(tokens[0]) + len(tokens[1])  # a stop string starting at the third token's text
    stop = free.text[cut:cut + 4]
    assert len(stop) == 4 and stop not in free.text[:cut + 3]
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=1,
              stop=[stop])
    r = client.completions.create(**kw)
    choice = r.choices[0]
    assert choice.text == free.text[:cut] and choice.finish_reason == "stop"
    assert choice.logprobs.tokens == tokens[:2]  # none of the tokens in the cut part
    assert all(o < len(choice.text) for o in choice.logprobs.text_offset)
    chunks = list(client.completions.create(**kw, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.tokens]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == tokens[:2] and text == choice.text
    assert live_server.wait_all_free()


def test_min_tokens_past_the_default_max_tokens_is_named_in_the_apis_words(live_server) -> None:
    r = httpx.post(f"{live_server.url}/v1/completions", timeout=60,
                   json={"model": MODEL_NAME, "prompt": PROMPT, "min_tokens": 20})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "min_tokens"
    assert err["message"] == ("min_tokens=20 exceeds max_tokens=16 (its default here: the "
                              "request gives none)")


def test_characters_split_over_tokens(client, serve_model, live_server) -> None:
    """Emoji are several byte tokens each: chat's "bytes" are each token's own (joined, they give
    the characters back, as OpenAI documents them), and text_offset indexes the choice's text
    (a token inside a character at that character's start; none past the end)."""
    from llm.engine.contract.outputs import TokenLogprobs
    from llm.serve.logprobs import LogprobsFormatter

    text = "Snakes \U0001f40d\U0001f40d and \u00e9t\u00e9"
    ids = serve_model.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # the emoji take byte tokens
    chat = LogprobsFormatter(serve_model.tokenizer).chat([TokenLogprobs(t, -1.0) for t in ids])
    assert b"".join(bytes(e["bytes"]) for e in chat["content"]).decode() == text
    r = client.completions.create(model=MODEL_NAME, prompt=text, echo=True, logprobs=1,
                                  max_tokens=1, temperature=0)
    choice = r.choices[0]
    offsets = choice.logprobs.text_offset
    assert offsets == sorted(offsets) and offsets[-1] < len(choice.text)
    assert offsets[len(ids)] == len(text)  # the generated token starts where the prompt ends
    after = serve_model.tokenizer.encode(text[:text.index(" and")], add_special_tokens=False)
    assert offsets[len(after)] == text.index(" and")
    assert live_server.wait_all_free()
