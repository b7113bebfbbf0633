"""API key, queue limit (429 + Retry-After), /health, /metrics in Prometheus text format, and the
`python -m llm.serve` entry point.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys

import httpx
from conftest import MODEL_NAME
from server_process import free_port, wait_healthy

from llm.engine.async_engine import AsyncEngine
from llm.engine.metrics import ServingMetrics
from llm.engine.scheduler import SchedulerConfig
from llm.serve import ServerConfig, create_app

PROM_LINE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-z_]+="[^"]*"\})? -?[0-9.e+]+$')


def asgi_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                             timeout=120)


def completion(**fields) -> dict:
    return {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 2, **fields}


def test_api_key(live_server) -> None:
    app = create_app(live_server.engine, ServerConfig(model_name=MODEL_NAME, api_key="sekret"))

    async def go() -> list[httpx.Response]:
        async with asgi_client(app) as c:
            return [
                await c.post("/v1/completions", json=completion()),
                await c.post("/v1/completions", json=completion(),
                             headers={"Authorization": "Bearer wrong"}),
                await c.get("/v1/models", headers={"Authorization": "Basic sekret"}),
                await c.post("/v1/completions", json=completion(),
                             headers={"Authorization": "Bearer sekret"}),
                await c.get("/health"),
            ]

    none, wrong, basic, right, health = asyncio.run(go())
    for r in (none, wrong, basic):
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    assert right.status_code == 200 and right.json()["usage"]["completion_tokens"] >= 1
    assert health.status_code == 200


def test_full_queue_is_429_with_retry_after(serve_model) -> None:
    engine = AsyncEngine(serve_model, SchedulerConfig(max_active=1, max_queue=1))
    app = create_app(engine, ServerConfig(model_name=MODEL_NAME, retry_after_s=3))

    async def go() -> list[httpx.Response]:
        async with asgi_client(app) as c:
            slow = completion(max_tokens=16, ignore_eos=True)
            return await asyncio.gather(
                c.post("/v1/completions", json=slow), c.post("/v1/completions", json=slow),
                c.post("/v1/completions", json={**slow, "stream": True,
                                                "stream_options": {"include_usage": True}}),
                c.post("/v1/chat/completions", json={
                    "model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 16, "ignore_eos": True}))

    try:
        responses = asyncio.run(go())
        metrics = engine.metrics.render()
    finally:
        engine.shutdown()
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 429, 429], [r.text for r in responses]
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "3"
            assert r.json()["error"]["type"] == "rate_limit_error"
        else:  # which two are admitted depends on arrival order: the streamed one may be
            assert usage(r)["completion_tokens"] == 16
    assert "llm_requests_rejected_total 2" in metrics


def test_retry_after_follows_the_drain_rate() -> None:
    """Refused clients are told to come back when the clients refused before them (and still
    waiting) and they should have drained: ceil((waiting + 1) / finished per busy second), time
    without generated tokens not counted, within [1, 60]; the configured value while nothing
    finished recently."""
    now = [100.0]
    m = ServingMetrics(clock=lambda: now[0])

    def busy(seconds: float, finishes: int) -> None:
        """Tokens every 1/16 s for `seconds`, `finishes` requests ending along the way (binary
        fractions: exact times, so exact busy slices)."""
        steps = int(seconds * 16)
        for i in range(steps):
            m.on_token(1 / 16, False)
            if i % (steps // finishes) == 0:
                m.on_finish("stop")
            now[0] += 1 / 16

    assert m.retry_after_s(7) == 7  # nothing finished yet: no rate to go by
    busy(0.5, 2)
    now[0] += 8.0  # idle: it does not dilute the rate
    assert m.retry_after_s(7) == 1  # 2 finished in 0.5 busy s: 4 / s; first in line
    assert [m.retry_after_s(7) for _ in range(6)] == [1, 1, 1, 2, 2, 2]  # 2nd..7th in line
    busy(2.0, 4)  # 6 finished in 2.5 busy s: 2.4 / s; every client told 1-2 s came back
    assert [m.retry_after_s(7) for _ in range(6)] == [1, 1, 2, 2, 3, 3]  # ceil(k / 2.4)
    for _ in range(400):
        m.retry_after_s(7)
    assert m.retry_after_s(7) == 60  # capped
    now[0] += 61.0  # every promise has passed and nothing finished recently
    assert m.retry_after_s(7) == 7


def test_stream_options_without_stream_is_400(live_server) -> None:
    """stream_options applies to streams only: with stream false (or absent) it is refused,
    not ignored."""
    app = create_app(live_server.engine, ServerConfig(model_name=MODEL_NAME))

    async def go() -> list[httpx.Response]:
        async with asgi_client(app) as c:
            return [await c.post("/v1/completions", json=completion(
                        stream_options={"include_usage": True}, **extra))
                    for extra in ({}, {"stream": False})]

    for r in asyncio.run(go()):
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "stream_options"


def test_tools_are_refused_not_ignored(live_server) -> None:
    """Fields this server cannot honour yet are 400s naming them; their neutral values pass
    (structured output: tests/serve/test_openai_structured.py)."""
    app = create_app(live_server.engine, ServerConfig(model_name=MODEL_NAME))
    refused = [("tool_choice", "auto"), ("function_call", "auto"),
               ("functions", [{"name": "f"}]), ("tools", [{"type": "function"}])]
    neutral = [("response_format", {"type": "text"}), ("tool_choice", "none")]

    async def go() -> list[httpx.Response]:
        async with asgi_client(app) as c:
            return [await c.post("/v1/chat/completions", json={
                        "model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}],
                        "max_tokens": 2, name: value}) for name, value in refused + neutral]

    responses = asyncio.run(go())
    for (name, _), r in zip(refused, responses):
        assert r.status_code == 400, (name, r.text)
        assert r.json()["error"]["param"] == name
    for r in responses[len(refused):]:
        assert r.status_code == 200, r.text
    turn = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "1", "type": "function",
                            "function": {"name": "f", "arguments": "{}"}}]}

    async def with_tool_calls() -> httpx.Response:
        async with asgi_client(app) as c:
            return await c.post("/v1/chat/completions", json={
                "model": MODEL_NAME, "max_tokens": 2,
                "messages": [{"role": "user", "content": "Hi"}, turn,
                             {"role": "user", "content": "And?"}]})

    r = asyncio.run(with_tool_calls())
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "messages[1].tool_calls is not supported" in r.json()["error"]["message"]
    turn = {"role": "assistant", "content": "Hello.", "tool_calls": []}  # no calls: as null
    r = asyncio.run(with_tool_calls())
    assert r.status_code == 200, r.text


def usage(r: httpx.Response) -> dict:
    """The usage of a whole response, or of the last SSE chunk of a streamed one that has it."""
    if not r.headers["content-type"].startswith("text/event-stream"):
        return r.json()["usage"]
    chunks = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: {")]
    return [c["usage"] for c in chunks if c.get("usage")][-1]


def test_health_and_metrics(live_server) -> None:
    httpx.post(live_server.url + "/v1/completions", json=completion(max_tokens=4), timeout=60)
    assert httpx.get(live_server.url + "/health").json() == {"status": "ok"}
    r = httpx.get(live_server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for line in r.text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-z_]+ .+$", line), line
            continue
        assert PROM_LINE.match(line), line
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    assert samples["llm_queue_depth"] == 0 and samples["llm_active_slots"] == 0
    assert samples["llm_generation_tokens_total"] >= 4
    assert samples["llm_generation_tokens_per_second"] > 0
    assert samples['llm_time_to_first_token_seconds_bucket{le="+Inf"}'] >= 1
    assert samples["llm_inter_token_latency_seconds_count"] >= 3
    assert samples['llm_requests_finished_total{reason="length"}'] >= 1


def test_python_m_llm_serve(tmp_path) -> None:
    port = free_port()
    env = {**os.environ, "LLM_API_KEY": "k1"}
    cmd = [sys.executable, "-m", "llm.serve", "--port", str(port), "--max-batch", "2",
           "--max-seq-len", "128", "--served-model-name", "tiny", "--log-level", "warning",
           "--threads", "1", "--weights", "dequantize"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, 120)
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
        assert httpx.post(url + "/v1/completions", json=body).status_code == 401
        r = httpx.post(url + "/v1/completions", json=body, timeout=60,
                       headers={"Authorization": "Bearer k1"})
        assert r.status_code == 200 and r.json()["model"] == "tiny"
    finally:
        proc.terminate()
        proc.wait(30)
    # SIGTERM is a requested stop: graceful, the engine released, exit status 0 (uvicorn
    # raised the signal again after its shutdown, so the process died by it: -15)
    assert proc.returncode == 0
    # the start-up line says what the weights hold (float32, dequantized: ~538 MB)
    assert re.search(rb"; weights 5\d\d MB", proc.stdout.read()), "no weights line"
    bad = subprocess.run([sys.executable, "-m", "llm.serve", "--model", "/nonexistent.gguf"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "/nonexistent.gguf" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "llm.serve", "--backend", "tt", "--threads",
                          "2"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--threads applies to --backend torch only" in bad.stderr


def test_request_errors_name_no_internal_counter(live_server) -> None:
    """A prompt beyond the context is a 400 that says why, without the engine's internal request
    index (which means nothing to the client)."""
    too_long = {"model": MODEL_NAME, "prompt": "word " * 2000, "max_tokens": 4}
    bad_ids = {"model": MODEL_NAME, "prompt": [1, 10**6], "max_tokens": 4}
    for body, says in ((too_long, "context"), (bad_ids, "outside"), (too_long, "context")):
        r = httpx.post(live_server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 400
        message = r.json()["error"]["message"]
        assert says in message and not re.search(r"request \d", message), message
