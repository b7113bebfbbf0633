"""vLLM's request fields with the official `openai` client: return_token_ids (the prompt's and
the generated token ids, whole and streamed: the deltas add up to the whole) and
return_tokens_as_token_ids (logprobs naming tokens "token_id:<id>"), truncate_prompt_tokens,
allowed_token_ids, bad_words and stop_reason, equal to the Python API's; and a clear 400 for each
malformed value, with nothing left held after."""

from __future__ import annotations

import openai
import pytest
from conftest import MODEL_NAME

from llm.engine.contract.sampling_params import SamplingParams

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
IDS = {"return_token_ids": True}


@pytest.fixture(scope="module")
def reference(serve_model):
    """The Python API's greedy completion of PROMPT (8 tokens, 2 logprobs alternatives)."""
    return serve_model.generate([PROMPT], SamplingParams(max_new_tokens=8, logprobs=2))[0]


def _extra(obj, name: str):
    return (obj.model_extra or {}).get(name)


def test_completion_token_ids_whole_and_streamed(client, reference) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body=IDS)
    choice = r.choices[0]
    assert _extra(choice, "prompt_token_ids") == reference.prompt_token_ids
    assert _extra(choice, "token_ids") == reference.token_ids
    assert choice.text == reference.text
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8,
                                            temperature=0, stream=True, extra_body=IDS))
    with_choice = [c.choices[0] for c in chunks if c.choices]
    assert _extra(with_choice[0], "prompt_token_ids") == reference.prompt_token_ids
    assert all(_extra(c, "prompt_token_ids") is None for c in with_choice[1:])
    assert [t for c in with_choice for t in _extra(c, "token_ids")] == reference.token_ids
    assert "".join(c.text for c in with_choice) == reference.text
    plain = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2,
                                      temperature=0)
    assert _extra(plain.choices[0], "token_ids") is None  # only when asked for


def test_chat_token_ids_whole_and_streamed(client, serve_model) -> None:
    want = serve_model.chat(CHAT, SamplingParams(max_new_tokens=6))
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=6,
                                       temperature=0, extra_body=IDS)
    assert _extra(r, "prompt_token_ids") == want.prompt_token_ids
    assert _extra(r.choices[0], "token_ids") == want.token_ids
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=6,
                                                 temperature=0, stream=True, extra_body=IDS))
    assert _extra(chunks[0], "prompt_token_ids") == want.prompt_token_ids
    assert all(_extra(c, "prompt_token_ids") is None for c in chunks[1:])
    assert [t for c in chunks for t in _extra(c.choices[0], "token_ids")] == want.token_ids


def test_n_choices_carry_their_own_token_ids(client, serve_model) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, n=3, seed=7,
                                  temperature=1.0, extra_body=IDS)
    streamed = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5,
                                              n=3, seed=7, temperature=1.0, stream=True,
                                              extra_body=IDS))
    assert sum(len(_extra(c, "token_ids")) for c in r.choices) == r.usage.completion_tokens
    for choice in r.choices:
        ids = _extra(choice, "token_ids")
        assert serve_model.tokenizer.decode(ids) == choice.text
        mine = [c.choices[0] for c in streamed if c.choices and c.choices[0].index == choice.index]
        assert [t for c in mine for t in _extra(c, "token_ids")] == ids
        assert sum(_extra(c, "prompt_token_ids") is not None for c in mine) == 1


def test_echo_puts_the_prompt_ids_in_the_echo_chunk(client, reference) -> None:
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8,
                                            temperature=0, echo=True, stream=True,
                                            extra_body=IDS))
    first = chunks[0].choices[0]
    assert first.text == PROMPT and _extra(first, "token_ids") == []
    assert _extra(first, "prompt_token_ids") == reference.prompt_token_ids
    rest = [c.choices[0] for c in chunks[1:] if c.choices]
    assert all(_extra(c, "prompt_token_ids") is None for c in rest)
    assert [t for c in rest for t in _extra(c, "token_ids")] == reference.token_ids


def test_logprobs_name_tokens_by_id(client, reference, serve_model) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                  logprobs=2, extra_body={"return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    assert lp.tokens == [f"token_id:{e.token}" for e in reference.logprobs]
    texts = [serve_model.tokenizer.decode([e.token], skip_special_tokens=False)
             for e in reference.logprobs]
    assert lp.text_offset == [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    for top, e in zip(lp.top_logprobs, reference.logprobs, strict=True):
        want = {f"token_id:{t}": v for t, v in e.top}
        want.setdefault(f"token_id:{e.token}", e.logprob)
        assert set(top) == set(want)
        assert [top[k] for k in want] == pytest.approx(list(want.values()), abs=1e-3)
    chat = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body={"return_tokens_as_token_ids": True})
    ids = [int(c.token.removeprefix("token_id:")) for c in chat.choices[0].logprobs.content]
    assert serve_model.tokenizer.decode(ids) == chat.choices[0].message.content
    content = chat.choices[0].logprobs.content
    assert b"".join(bytes(c.bytes) for c in content).decode() == chat.choices[0].message.content
    for c in content:  # the chosen token's bytes are its text's, the alternatives' their label's
        assert all(t.token.startswith("token_id:") for t in c.top_logprobs)
        assert all(bytes(t.bytes).decode() == t.token for t in c.top_logprobs)


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(client, serve_model) -> None:
    ids = serve_model.tokenizer.encode("Once upon a time there was a little dog called Max who")
    keep = 6
    want = serve_model.generate([ids[-keep:]], SamplingParams(max_new_tokens=5))[0]
    r = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=5, temperature=0,
                                  echo=True, extra_body={"truncate_prompt_tokens": keep, **IDS})
    choice = r.choices[0]
    assert r.usage.prompt_tokens == keep and _extra(choice, "prompt_token_ids") == ids[-keep:]
    assert _extra(choice, "token_ids") == want.token_ids
    kept = serve_model.tokenizer.decode(ids[-keep:], skip_special_tokens=False)
    assert choice.text == kept + want.text  # echo shows the prompt as it ran
    text = serve_model.tokenizer.decode(ids)
    r = client.completions.create(model=MODEL_NAME, prompt=text, max_tokens=2, temperature=0,
                                  echo=True, extra_body={"truncate_prompt_tokens": 500})
    assert r.choices[0].text.startswith(text)  # nothing cut: the prompt as sent
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=2,
                                       extra_body={"truncate_prompt_tokens": -1})
    assert r.usage.prompt_tokens == len(serve_model.tokenizer.encode(
        serve_model.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True),
        add_special_tokens=False))


def test_allowed_token_ids_restrict_the_choice(client, serve_model) -> None:
    allowed = serve_model.tokenizer.encode(" Paris London Rome yes no")
    want = serve_model.generate([PROMPT], SamplingParams(max_new_tokens=6, logprobs=2,
                                                         allowed_token_ids=allowed))[0]
    assert set(want.token_ids) <= set(allowed)
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0,
                                  logprobs=2, extra_body={"allowed_token_ids": allowed, **IDS})
    choice = r.choices[0]
    assert _extra(choice, "token_ids") == want.token_ids and choice.text == want.text
    for top in choice.logprobs.top_logprobs:  # the alternatives are allowed tokens too
        assert set(top) <= {serve_model.tokenizer.decode([t]) for t in allowed}
    sampled = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12,
                                        temperature=1.5, seed=3,
                                        extra_body={"allowed_token_ids": allowed[:2], **IDS})
    assert set(_extra(sampled.choices[0], "token_ids")) <= set(allowed[:2])


def test_allowed_stop_tokens_alone_under_min_tokens_are_refused(client, serve_model) -> None:
    eos = list(serve_model.tokenizer.eos_ids)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4,
                                  extra_body={"allowed_token_ids": eos, "min_tokens": 2})
    assert e.value.body["param"] == "allowed_token_ids" and "only stop tokens" in e.value.message
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0,
                                  extra_body={"allowed_token_ids": eos + [5], "min_tokens": 2,
                                              **IDS})
    assert _extra(r.choices[0], "token_ids")[:2] == [5, 5]


BAD = {"return_token_ids": ["yes"], "return_tokens_as_token_ids": [1],
       "truncate_prompt_tokens": [0, -2, 1.5, "3", True, 10**6],
       "allowed_token_ids": [[], [-1], [1.5], "1", [True], [10**6], {"1": 1}],
       "bad_words": ["x", [""], [" "], [1], ["a"] * 65]}


@pytest.mark.parametrize("field, value", [(f, v) for f, vs in BAD.items() for v in vs])
def test_malformed_values_are_refused_by_name(client, live_server, field, value) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2,
                                  extra_body={field: value})
    assert e.value.body["param"] == field
    assert live_server.wait_all_free()


def test_bad_words_never_appear_in_the_output(client, serve_model, reference) -> None:
    from llm.engine.bad_words import banned_sequences

    word = reference.text.split()[0].strip(".,")  # the word greedy decoding says first
    banned = banned_sequences(serve_model.tokenizer, [word])
    params = SamplingParams(max_new_tokens=8, bad_words=[word])
    want = serve_model.generate([PROMPT], params)[0]
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body={"bad_words": [word], **IDS})
    ids = _extra(r.choices[0], "token_ids")
    assert ids == want.token_ids and ids != reference.token_ids
    for seq in banned:
        assert all(tuple(ids[i:i + len(seq)]) != seq for i in range(len(ids)))
    assert word not in r.choices[0].text.split()


def test_stop_reason_names_the_stop_string_or_token(client, serve_model, reference) -> None:
    """vLLM's stop_reason: the stop string, or the stop_token_ids entry, that ended the output;
    null for EOS and for a length finish; whole, and on a stream's finish chunk."""
    stop, token = reference.text[3:6], reference.token_ids[2]
    cases = [({"stop": [stop]}, {"stop": [stop]}, stop),
             ({"stop_token_ids": [token]}, {"extra_body": {"stop_token_ids": [token]}}, token),
             ({}, {}, None)]
    for python, http, want in cases:
        params = SamplingParams(max_new_tokens=8, **python)
        assert serve_model.generate([PROMPT], params)[0].stop_reason == want
        r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8,
                                      temperature=0, **http)
        assert _extra(r.choices[0], "stop_reason") == want
        chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8,
                                                temperature=0, stream=True, **http))
        ends = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(ends) == 1 and _extra(ends[0], "stop_reason") == want
    chat = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=30,
                                          temperature=0).choices[0]
    assert chat.finish_reason == "stop" and _extra(chat, "stop_reason") is None  # EOS
    eos = list(serve_model.tokenizer.eos_ids)
    listed = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=30,
                                            temperature=0,
                                            extra_body={"stop_token_ids": eos}).choices[0]
    assert listed.message.content == chat.message.content
    assert _extra(listed, "stop_reason") is None  # EOS first, as vLLM checks it


def test_with_token_ids_logprobs_cover_every_token_id(client, reference, serve_model) -> None:
    """A stop string cuts the text (and, as before, the logprobs matching it), but with
    return_token_ids the logprobs cover every token id, as vLLM's do: whole and streamed."""
    stop = serve_model.tokenizer.decode(reference.token_ids[2:4])  # tokens 2 and 3 are cut
    base = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1,
                stop=[stop], extra_body={**IDS, "return_tokens_as_token_ids": True})
    choice = client.completions.create(**base).choices[0]
    ids = _extra(choice, "token_ids")
    assert choice.logprobs.tokens == [f"token_id:{t}" for t in ids] and len(ids) == 4
    chunks = list(client.completions.create(**base, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.tokens]
    assert streamed == choice.logprobs.tokens
    plain = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8,
                                      temperature=0, logprobs=1, stop=[stop]).choices[0]
    assert "".join(plain.logprobs.tokens) == plain.text  # without: the text's tokens only
    assert len(plain.logprobs.tokens) == 2
