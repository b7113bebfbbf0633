"""vLLM's request_id through the server, with the official openai client: a request carrying one
gets "cmpl-<request_id>" / "chatcmpl-<request_id>" as the id of its response and of every streamed
chunk (n > 1, echo and the usage chunk included), as vLLM builds it; without one, a generated id as
before; a malformed one (empty, not a string, too long, unprintable, a lone surrogate) is a 400
naming request_id, and every page and slot is free after.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import MODEL_NAME

from llm.serve.protocol import MAX_REQUEST_ID

MESSAGES = [{"role": "user", "content": "Hi"}]


def _complete(client: openai.OpenAI, request_id, stream: bool, **kw):
    extra = {} if request_id is None else {"request_id": request_id}
    return client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=3,
                                     temperature=0, stream=stream, extra_body=extra, **kw)


def _chat(client: openai.OpenAI, request_id, stream: bool, **kw):
    extra = {} if request_id is None else {"request_id": request_id}
    return client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=3,
                                          temperature=0, stream=stream, extra_body=extra, **kw)


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("request_id", ["req-42", "\u00e9t\u00e9 \U0001f600/ x",
                                        "r" * MAX_REQUEST_ID])
def test_a_whole_response_takes_its_id_from_request_id(live_server, client, chat,
                                                       request_id) -> None:
    r = (_chat if chat else _complete)(client, request_id, False)
    assert r.id == f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
    assert r.usage.completion_tokens >= 1
    assert live_server.wait_all_free()


@pytest.mark.parametrize("chat", [False, True])
def test_every_streamed_chunk_takes_its_id_from_request_id(live_server, client, chat) -> None:
    chunks = list((_chat if chat else _complete)(
        client, "stream-7", True, n=2, stream_options={"include_usage": True}))
    assert len(chunks) > 3 and chunks[-1].usage is not None and not chunks[-1].choices
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    assert {c.id for c in chunks} == {f"{'chatcmpl' if chat else 'cmpl'}-stream-7"}
    assert live_server.wait_all_free()


def test_n_choices_echo_and_best_of_share_the_id(live_server, client) -> None:
    whole = _complete(client, "many", False, n=2, best_of=3, echo=True, logprobs=1)
    assert whole.id == "cmpl-many" and len(whole.choices) == 2
    chat = _chat(client, "many", False, n=3)
    assert chat.id == "chatcmpl-many" and len(chat.choices) == 3
    echoed = list(_complete(client, "echoed", True, n=2, echo=True))
    assert {c.id for c in echoed} == {"cmpl-echoed"}
    assert echoed[0].choices[0].text == "Once upon a time"
    assert live_server.wait_all_free()


def test_without_request_id_the_ids_are_generated(live_server, client) -> None:
    for chat in (False, True):
        prefix = "chatcmpl" if chat else "cmpl"
        send = _chat if chat else _complete
        ids = [send(client, None, False).id, send(client, None, False).id]
        chunks = list(send(client, None, True))
        assert len({c.id for c in chunks}) == 1  # one id for the whole stream
        ids.append(chunks[0].id)
        assert all(re.fullmatch(prefix + r"-[0-9a-f]{32}", i) for i in ids), ids
        assert len(set(ids)) == 3
    # a null request_id is no request_id
    r = httpx.post(live_server.url + "/v1/completions", timeout=60, json={
        "model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2, "request_id": None})
    assert r.status_code == 200 and re.fullmatch(r"cmpl-[0-9a-f]{32}", r.json()["id"])
    assert live_server.wait_all_free()


def test_concurrent_requests_may_share_a_request_id(live_server, client) -> None:
    """The id is the client's: the engine's own request index is unaffected, so requests of one
    request_id run side by side, each answered in full under it."""
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: (_chat if i % 2 else _complete)(client, "same", False),
                                range(4)))
    assert [r.id for r in results] == ["cmpl-same", "chatcmpl-same"] * 2
    assert all(r.usage.completion_tokens >= 1 for r in results)
    assert live_server.wait_all_free()


MALFORMED = ["", 5, True, ["a"], {"id": "a"}, "x" * (MAX_REQUEST_ID + 1), "a\nb", "nul\x00",
             "tab\there", "\u2028"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("request_id", MALFORMED)
def test_a_malformed_request_id_is_a_400_naming_it(live_server, client, request_id, chat,
                                                   stream) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        (_chat if chat else _complete)(client, request_id, stream)
    assert e.value.body["param"] == "request_id"
    assert "'request_id'" in e.value.message
    assert f"at most {MAX_REQUEST_ID} printable characters" in e.value.message
    assert live_server.wait_all_free()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_lone_surrogate_request_id_is_a_400_naming_it(live_server, path) -> None:
    """JSON's \\ud800 escape: a str Python holds but cannot encode (the openai client cannot send
    it, so the body is written by hand)."""
    body = {"model": MODEL_NAME, "max_tokens": 2, "stream": path.endswith("chat/completions"),
            **({"messages": MESSAGES} if "chat" in path else {"prompt": "Hi"})}
    raw = json.dumps(body)[:-1] + ', "request_id": "ok\\ud800"}'
    r = httpx.post(live_server.url + path, content=raw.encode(), timeout=60,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "request_id" and f"at most {MAX_REQUEST_ID}" in error["message"]
    assert live_server.wait_all_free()
