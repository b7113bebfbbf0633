"""Over HTTP, a request beyond the backend's capabilities is a 400 naming the parameter, for that
request alone: the server keeps serving (the architecture issue's reproduction: one request with
the API's default temperature of 1.0 used to take a tt server down)."""

from __future__ import annotations

import asyncio

import httpx
from fakes import GreedyOnlyBackend, fake_parts

from llm.engine.async_engine import AsyncEngine
from llm.engine.core import EngineCore
from llm.serve import ServerConfig, create_app


def test_unsupported_sampling_is_a_400_and_the_server_keeps_serving() -> None:
    fake, tok, _ = fake_parts()
    core = EngineCore(GreedyOnlyBackend(fake.runtime), tok)
    engine = AsyncEngine(type("Model", (), {"core": core})())
    app = create_app(engine, ServerConfig(model_name="fake"))

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            body = {"model": "fake", "prompt": [5, 6, 7], "max_tokens": 3}
            return [await c.post("/v1/completions", json=body),  # temperature defaults to 1.0
                    await c.post("/v1/completions", json={**body, "top_p": 0.5}),
                    await c.post("/v1/completions", json={**body, "temperature": 0}),
                    await c.get("/health")]

    try:
        default, top_p, greedy, health = asyncio.run(go())
    finally:
        engine.shutdown()
    for r in (default, top_p):
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "temperature" and "greedy-only backend" in err["message"]
    assert greedy.status_code == 200 and greedy.json()["usage"]["completion_tokens"] == 3
    assert health.status_code == 200 and engine.error is None


def test_features_the_backend_lacks_are_400s_naming_the_parameter() -> None:
    """A backend without logprobs / penalties (a greedy-only one) refuses each of them
    over HTTP, naming the request's parameter, and holds nothing after."""
    fake, tok, _ = fake_parts()
    core = EngineCore(GreedyOnlyBackend(fake.runtime), tok)
    engine = AsyncEngine(type("Model", (), {"core": core})())
    app = create_app(engine, ServerConfig(model_name="fake"))
    body = {"model": "fake", "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0}
    cases = [("/v1/completions", {**body, "logprobs": 2}, "logprobs"),
             ("/v1/completions", {**body, "logprobs": 0, "echo": True}, "logprobs"),
             ("/v1/completions", {**body, "presence_penalty": 0.5}, "presence_penalty"),
             ("/v1/completions", {**body, "frequency_penalty": -0.5}, "frequency_penalty"),
             ("/v1/completions", {**body, "repetition_penalty": 1.2}, "repetition_penalty"),
             ("/v1/completions", {**body, "logit_bias": {"5": 3}}, "logit_bias"),
             ("/v1/completions", {**body, "min_tokens": 2}, "min_tokens")]

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            out = [await c.post(path, json=b) for path, b, _ in cases]
            out.append(await c.post("/v1/completions", json={**body, "echo": True}))
            return out

    try:
        *refused, echoed = asyncio.run(go())
    finally:
        engine.shutdown()
    for r, (_, _, param) in zip(refused, cases, strict=True):
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param, err
        assert "not supported by the greedy-only backend" in err["message"], err
    assert echoed.status_code == 200  # echo alone needs nothing of the backend
    assert echoed.json()["choices"][0]["text"].startswith("<5><6><7>")
    assert engine.error is None and not core.scheduler.has_work
    assert core.pages.allocator.num_free == core.pages.allocator.capacity
