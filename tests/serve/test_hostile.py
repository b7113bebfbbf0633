"""At least 200 malformed or hostile requests: each gets its expected status (never a 5xx) with an
OpenAI-style JSON error, and afterwards the server still serves and every page is free.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import time

import httpx
from conftest import MODEL_NAME, serve_in_thread

from llm.serve import ServerConfig, create_app

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
OK_CHAT = [{"role": "user", "content": "Hi"}]
NAN, INF = float("nan"), float("inf")


def body(path: str, **fields) -> dict:
    base = {"model": MODEL_NAME, "max_tokens": 1}
    base.update({"messages": OK_CHAT} if path == CHAT else {"prompt": "Hi"})
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def cases() -> list[tuple[str, str, bytes, int]]:
    """(method, path, raw body, expected status)."""
    out: list[tuple[str, str, bytes, int]] = []

    def add(path: str, status: int, raw: bytes | None = None, **fields) -> None:
        if raw is None:
            raw = json.dumps(body(path, **fields), allow_nan=True).encode()
        out.append(("POST", path, raw, status))

    bad_values = {
        "model": [1, None, [], {}, "gpt-4", "", "x" * 10_000, "\ud800"],
        "max_tokens": [-1, 0, "5", 1.5, True, 10**9, 10**30, NAN, [], 400 * 1000],
        "temperature": [-1, "hot", NAN, INF, -INF, True, [], {"a": 1}, 10**400],
        "top_p": [0, -0.5, 1.5, NAN, "x", False],
        "top_k": [-5, 1.5, "1", 10**40, True],
        "seed": [-2**63 - 1, 2**64, "x", 1.5, NAN],
        "stop": [1, [1], [""], "", ["a"] * 100, {}, ["\udfff"]],
        "stream": ["yes", 1, [], "true"],
        "n": [0, "1", True, -1, 1.5, 10**6],
        "logprobs": [21, "5", -1, 1.5],
        "echo": ["yes", 2],
        "top_logprobs": [21, "x"],
        "best_of": [0, "x", True, 1.5],
        "presence_penalty": [2.5, "x", NAN],
        "frequency_penalty": [-2.5, []],
        "repetition_penalty": [0, -1, "x"],
        "logit_bias": [{"50256": -100}, {"x": 1}, {"1": 1e9}, [1], {"1": NAN}, {"1": 10**400}],
        "min_tokens": [-1, 2, "1"],
        "stream_options": ["x", {"include_usage": "yes"}, 5],
        "ignore_eos": ["no", 3],
        "stop_token_ids": [[-1], "1", [1.5], [49152], [1] * 300, {}, [True]],
        "add_generation_prompt": ["yes", 1],
        "continue_final_message": ["yes", 0],
        "min_p": [1.5, "0", -0.1, NAN, 10**400], "structural_tag": ["<json>"],
        "use_beam_search": [True], "length_penalty": [0.5],
        "include_stop_str_in_output": ["yes", 1], "skip_special_tokens": [0, "false"],
        "bad_words": ["x", [""], [1]], "allowed_token_ids": [[], [-1], "x", [49152]],
        "truncate_prompt_tokens": [0, -2, "5", 1.5, 10**6],
        "return_token_ids": ["yes", 1], "return_tokens_as_token_ids": [0, "true"],
        "chat_template": ["{{ x }}"], "chat_template_kwargs": ["x", {"messages": []}],
        "priority": [1], "modalities": [["text", "audio"]], "reasoning_effort": ["low"],
        "add_special_tokens": ["yes"],
        "cache_salt": ["", 7, "s" * 1025, ["a"], {}, False, "\ud800"],
        "kv_transfer_params": [{"do_remote_decode": True}, "x"], "early_stopping": [True, "never"],
        "thinking_token_budget": [10], "truncation_side": ["right"], "logprob_token_ids": [[1]],
    }
    for path in (COMPLETIONS, CHAT):
        for field, values in bad_values.items():
            for v in values:
                status = 404 if field == "model" and isinstance(v, str) else 400
                add(path, status, **{field: v})
    prompts = [None, 1, {}, [1.5], ["a", 1], [[1], "b", [1.5]], [True], [-1], [10**30], [49152],
               [], "", "\ud800", "word " * 3000, [1] * 600, [[]], [["a"]], [[1], []],
               ["a", "\ud800"], [[1], [49152]], ["a", "word " * 3000], [[1]] * 10_000]
    for p in prompts:
        add(COMPLETIONS, 400, prompt=p)
    messages = [None, "hi", [], [{}], [{"role": 1}], [{"role": "wizard", "content": "x"}],
                [{"role": "user", "content": 1}], [{"role": "user"}], [None], [1],
                [{"role": "user", "content": [{"type": "image_url", "url": "x"}]}],
                [{"role": "user", "content": [{"type": "text"}]}],
                [{"role": "user", "content": "\udc00"}],
                [{"role": "user", "content": "tell " * 3000}]]
    for m in messages:
        add(CHAT, 400, messages=m)
    add(CHAT, 400, messages=..., prompt="Hi")
    add(COMPLETIONS, 400, prompt=..., messages=OK_CHAT)
    raws = [b"", b"{", b"[1,2", b"nul", b"{'model': 1}", b'{"model": "x",}', b"\xff\xfe\x00",
            b'{"model": "\xc3\x28"}', b"\xc3\x28", b"[" * 100_000, b'{"a":' * 50_000,
            b"1e999999", b"null", b"true", b"42", b'"text"', b"[]", b'{"prompt": "Hi"}',
            b"\x00" * 100, b'{"model": "' + MODEL_NAME.encode() + b'", "prompt": "\\ud800"}']
    for path in (COMPLETIONS, CHAT):
        for raw in raws:
            out.append(("POST", path, raw, 400))
        out.append(("POST", path, b"x" * (3 * 1024 * 1024), 413))
        out.append(("GET", path, b"", 405))
        out.append(("PUT", path, b"{}", 405))
    for path in ("/", "/v1", "/v1/complete", "/v2/completions", "/v1/models/nope",
                 "/v1/models/%ff%fe", "/../etc/passwd", "/metrics/x"):
        out.append(("GET", path, b"", 404))
    out.append(("DELETE", "/health", b"", 405))
    out.append(("POST", "/v1/models", b"{}", 405))
    for path in (COMPLETIONS, CHAT):  # fields that change nothing are ignored; unknown: 400
        add(path, 200, user="u1", metadata=None, logprobs=None, safety_identifier="s",
            prompt_cache_key="k", parallel_tool_calls=True, store=False)
        add(path, 400, user="u1", frobnicate={"deep": [1, 2]})
        add(path, 400, max_token=3)
        add(path, 200, temperature=0, top_k=-1, seed=0, stop=["\n\n"], n=1, stream=False)
        add(path, 200, min_p=0, use_beam_search=False, length_penalty=1.0,  # "not used" values
            skip_special_tokens=False, include_stop_str_in_output=True, bad_words=[],
            modalities=["text"], priority=0, stop_token_ids=[])
        add(path, 200, cache_salt="tenant-1", kv_transfer_params={}, early_stopping=False,
            thinking_token_budget=-1, truncation_side="left")  # a salt; "not used" values
    for flag in (True, False):
        add(COMPLETIONS, 200, add_special_tokens=flag)
        add(CHAT, 200, add_special_tokens=flag)
    add(CHAT, 200, add_generation_prompt=True, top_logprobs=0, best_of=1, priority=0.0,
        chat_template_kwargs={"enable_thinking": False})  # neutral values clients send
    add(COMPLETIONS, 200, add_generation_prompt=True, continue_final_message=False,
        top_logprobs=0)  # chat fields at their neutral values
    add(COMPLETIONS, 400, add_generation_prompt=False)  # a chat parameter
    add(COMPLETIONS, 400, chat_template_kwargs={"a": 1})
    add(CHAT, 400, best_of=2)
    add(CHAT, 400, stream=True, stream_options={"continuous_usage_stats": True})
    add(CHAT, 400, add_generation_prompt=True, continue_final_message=True)
    add(CHAT, 200, continue_final_message=True,  # a blank answer begun: continued as transformers
        messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}])
    return out


async def fire(url: str, all_cases) -> list[tuple[int, str, tuple]]:
    sem = asyncio.Semaphore(16)

    async def one(client: httpx.AsyncClient, case) -> tuple[int, str, tuple]:
        method, path, raw, _ = case
        async with sem:
            r = await client.request(method, path, content=raw,
                                     headers={"content-type": "application/json"})
            return r.status_code, r.text, case

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(*(one(client, c) for c in all_cases))


def test_hostile_requests_get_4xx_json_and_server_survives(live_server) -> None:
    all_cases = cases()
    assert len(all_cases) >= 200
    results = asyncio.run(fire(live_server.url, all_cases))
    wrong = [(status, text[:200], case[:2], case[2][:80], case[3])
             for status, text, case in results if status != case[3]]
    assert not wrong, f"{len(wrong)} unexpected statuses: {wrong[:10]}"
    for status, text, _ in results:
        if status >= 400:
            err = json.loads(text)["error"]
            assert isinstance(err["message"], str) and err["message"] and err["type"]
    assert httpx.get(live_server.url + "/health").status_code == 200
    r = httpx.post(live_server.url + COMPLETIONS, json=body(COMPLETIONS, max_tokens=2), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert live_server.wait_all_free()


def test_a_compressed_body_is_415_naming_the_encoding(live_server) -> None:
    raw = gzip.compress(json.dumps(body(COMPLETIONS)).encode())
    r = httpx.post(live_server.url + COMPLETIONS, content=raw, timeout=60,
                   headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status_code == 415
    assert "Content-Encoding 'gzip' is not supported" in r.json()["error"]["message"]
    assert live_server.wait_all_free()


def test_a_stalled_body_is_408_and_other_requests_go_on(live_server) -> None:
    app = create_app(live_server.engine, ServerConfig(model_name=MODEL_NAME, body_timeout_s=0.5))
    with serve_in_thread(app) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                      b"application/json\r\nContent-Length: 100\r\n\r\n{\"model\": ")
            t0 = time.monotonic()
            parts = [s.recv(4096)]  # then nothing more: the server must not wait forever
            waited = time.monotonic() - t0
            while parts[-1]:  # the rest of the reply (its body may come in a later segment),
                parts.append(s.recv(4096))  # until the server closes the connection
            reply = b"".join(parts).decode()
        assert reply.startswith("HTTP/1.1 408") and "did not arrive within 0.5 s" in reply
        assert 0.4 < waited < 5
        r = httpx.post(url + COMPLETIONS, json=body(COMPLETIONS), timeout=60)
        assert r.status_code == 200
    assert live_server.wait_all_free()
