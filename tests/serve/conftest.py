"""Shared serving fixtures: the default model loaded once for the whole tests/serve suite, and one
live server (uvicorn on 127.0.0.1, an ephemeral port) over an AsyncEngine on it.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest
import uvicorn

import llm
from llm.engine.async_engine import AsyncEngine
from llm.engine.scheduler import SchedulerConfig
from llm.serve import ServerConfig, create_app
from llm.serve.__main__ import GIL_SWITCH_INTERVAL_S, KEEP_ALIVE_S

MODEL_NAME = "smollm2-test"
MAX_BATCH = 16
MAX_SEQ_LEN = 512


@dataclass
class LiveServer:
    url: str
    engine: AsyncEngine
    model: llm.LLM

    def wait_all_free(self, timeout: float = 30.0) -> bool:
        """Wait until the engine holds no request and every KV page is free."""
        alloc = self.model.generator.pages.allocator
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.engine.in_flight == 0 and alloc.num_free == alloc.capacity
                    and not self.engine.scheduler.has_work):
                return True
            time.sleep(0.05)
        return False


@pytest.fixture(scope="session")
def serve_model() -> llm.LLM:
    return llm.LLM(max_batch=MAX_BATCH, max_seq_len=MAX_SEQ_LEN, progress=False)


@pytest.fixture(scope="session", autouse=True)
def short_gil_switch_interval() -> Iterator[None]:
    """As `python -m llm.serve` does: the engine thread gets the GIL back sooner."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    yield
    sys.setswitchinterval(old)


@pytest.fixture(scope="session")
def live_server() -> Iterator[LiveServer]:
    """A server on its own model: its AsyncEngine holds that model's engine for the session, while
    tests drive `serve_model` synchronously as the reference."""
    model = llm.LLM(max_batch=MAX_BATCH, max_seq_len=MAX_SEQ_LEN, progress=False)
    engine = AsyncEngine(model, SchedulerConfig(max_queue=96))
    app = create_app(engine, ServerConfig(model_name=MODEL_NAME))
    with serve_in_thread(app) as url:
        yield LiveServer(url, engine, model)
    engine.shutdown()


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    """The official openai client on the live server (no retries: a refusal is seen as sent)."""
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


class serve_in_thread:
    """Context manager: run `app` with uvicorn on a free loopback port; yields the base URL."""

    def __init__(self, app) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                                    timeout_graceful_shutdown=2,
                                                    timeout_keep_alive=KEEP_ALIVE_S))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        host, port = self.sock.getsockname()
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
