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
