"""/v1/completions with a batch of prompts (a list of strings or of token-id lists), with the
official openai client: one request per prompt, the choices prompt after prompt (n each, indexed
in that order, as OpenAI and vLLM index them), each the same as its prompt sent alone; streamed
chunks interleaved by index, one usage for them all; a bad prompt anywhere is a 400 naming its
position before any runs, a failure after submission cancels the others, and nothing is left
held."""

from __future__ import annotations

from collections import defaultdict

import httpx
import openai
import pytest
from conftest import MODEL_NAME
from test_disconnect import LONG, cancelled_count

PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3,"]


def _alone(client: openai.OpenAI, prompt, max_tokens: int = 6, **kw):
    return client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens,
                                     **kw)


@pytest.mark.parametrize("as_ids", [False, True])
def test_a_batchs_choices_are_each_prompts_own(client, serve_model, live_server,
                                               as_ids) -> None:
    prompts = ([serve_model.tokenizer.encode(p) for p in PROMPTS] if as_ids else PROMPTS)
    alone = [_alone(client, p, temperature=0, n=2) for p in prompts]
    r = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=6, n=2,
                                  temperature=0)
    assert [c.index for c in r.choices] == list(range(2 * len(PROMPTS)))
    assert [c.text for c in r.choices] == [c.text for a in alone for c in a.choices]
    assert r.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert live_server.wait_all_free()


def test_a_seed_gives_each_prompt_its_own_samples(client, live_server) -> None:
    """The same seed for every prompt: the same prompt twice samples the same choices."""
    r = client.completions.create(model=MODEL_NAME, prompt=[PROMPTS[1], PROMPTS[1]],
                                  max_tokens=8, n=2, temperature=1.0, seed=11)
    texts = [c.text for c in r.choices]
    assert texts[:2] == texts[2:]
    assert texts[:2] == [c.text for c in _alone(client, PROMPTS[1], n=2, temperature=1.0,
                                                seed=11, max_tokens=8).choices]
    assert live_server.wait_all_free()


def test_streamed_chunks_rebuild_the_whole_response(client, live_server) -> None:
    whole = client.completions.create(model=MODEL_NAME, prompt=PROMPTS, max_tokens=6,
                                      temperature=0, echo=True, logprobs=1)
    chunks = list(client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS, max_tokens=6, temperature=0, echo=True, logprobs=1,
        stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    texts, offsets, finish = defaultdict(str), defaultdict(list), {}
    for c in chunks[:-1]:
        (choice,) = c.choices
        texts[choice.index] += choice.text
        offsets[choice.index] += choice.logprobs.text_offset if choice.logprobs else []
        if choice.finish_reason:
            finish[choice.index] = choice.finish_reason
    assert [texts[i] for i in range(len(PROMPTS))] == [c.text for c in whole.choices]
    for i, c in enumerate(whole.choices):
        assert c.text.startswith(PROMPTS[i]) and c.logprobs.text_offset[0] == 0
        assert offsets[i] == c.logprobs.text_offset and finish[i] == c.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert live_server.wait_all_free()


@pytest.mark.parametrize("prompt, message", [
    (["Hi", "word " * 3000], "prompt[1]: the prompt has"),
    ([[1], []], "prompt[1]: the prompt is empty"),
    ([[1], [49152]], "prompt[1]: "),  # out of the vocabulary: refused at submission
    (["Hi", 7], "'prompt' must be a string, a list of token ids"),
    ([[1], ["a"]], "'prompt[1]' must be a string or a list of token ids"),
])
def test_a_bad_prompt_anywhere_is_a_400_and_nothing_runs(client, live_server, prompt,
                                                         message) -> None:
    """Checked by the server and the engine before any prompt is queued: none ran, so none was
    cancelled either."""
    before = cancelled_count(live_server.url)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=4)
    assert message in info.value.body["message"] and info.value.body["param"] == "prompt"
    assert live_server.wait_all_free() and cancelled_count(live_server.url) == before


def test_more_prompts_than_the_server_holds_is_a_400(client, live_server) -> None:
    cap = live_server.engine.scheduler.capacity
    with pytest.raises(openai.BadRequestError, match=f"exceeds this server's {cap} requests"):
        client.completions.create(model=MODEL_NAME, prompt=[[1]] * (cap + 1), max_tokens=1)
    assert live_server.wait_all_free()


def test_a_disconnect_cancels_every_prompt(live_server) -> None:
    before = cancelled_count(live_server.url)
    body = {"model": MODEL_NAME, "prompt": PROMPTS, "max_tokens": LONG, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", live_server.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk, then the client goes away
    assert live_server.wait_all_free()
    assert cancelled_count(live_server.url) - before == len(PROMPTS)
