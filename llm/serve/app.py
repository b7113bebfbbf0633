"""The OpenAI-compatible ASGI app (Starlette) over an AsyncEngine.

Routes: POST /v1/completions, POST /v1/chat/completions (both streamed as SSE with
`"stream": true`), GET /v1/models, GET /v1/models/{id}, GET /health, GET /metrics (Prometheus).
Every error is OpenAI's JSON error object: 400 bad input, 401 missing or wrong API key, 404 unknown
model or route, 405 wrong method, 413 body too large, 429 queue full (with Retry-After), 503 engine
shut down (with Retry-After).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from llm.engine.async_engine import AsyncEngine, EngineClosedError, RequestStream
from llm.engine.contract.sampling_params import SamplingParams, SamplingParamsError
from llm.engine.paged_kv import OutOfPagesError
from llm.engine.scheduler import QueueFullError
from llm.engine.sequence import RequestError, RequestFailure, RequestOutput
from llm.model.tokenizer.errors import TokenizerError
from llm.serve.logprobs import LogprobsFormatter
from llm.serve.protocol import (
    DEFAULT_COMPLETION_TOKENS,
    ApiError,
    ParsedRequest,
    api_param,
    parse_request,
    short_repr,
)
from llm.serve.responses import (
    SSE_DONE,
    ResponseShape,
    merged,
    response_id,
    sse,
    usage_so_far,
)
from llm.serve.streaming import ClientGone, EventStreamResponse, race_disconnect

T = TypeVar("T")


@dataclass(frozen=True)
class ServerConfig:
    """model_name: the id clients must send as "model". api_key: required Bearer token (None =
    open). max_body_bytes: largest accepted request body. body_timeout_s: longest a client may
    take to send its body (a stalled one gets 408 and its connection back). retry_after_s:
    Retry-After on 503, and on 429 until requests have finished recently (then it follows their
    drain rate: see ServingMetrics.retry_after_s).
    """

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 2 * 1024 * 1024
    body_timeout_s: float = 30.0
    retry_after_s: int = 1


class _Handlers:
    def __init__(self, engine: AsyncEngine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.started = int(time.time())  # the model card's "created"

    async def health(self, request: Request) -> Response:
        if self.engine.error is not None:
            raise ApiError(503, f"engine failed: {self.engine.error!r}", kind="server_error",
                           headers=self._retry())
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        return PlainTextResponse(self.engine.metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        self._authorize(request)
        name = request.path_params["model"]
        if name != self.config.model_name:
            raise ApiError(404, f"the model {short_repr(name)} does not exist", "model",
                           code="model_not_found")
        return JSONResponse(self._model_card())

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.config.model_name, "object": "model", "created": self.started,
                "owned_by": "llm", "max_model_len": self.engine.max_seq_len}

    def _retry(self) -> dict[str, str]:
        return {"Retry-After": str(self.config.retry_after_s)}

    def _authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
                token.strip().encode("utf-8", "replace"), key.encode()):
            raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           kind="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def _read_json(self, request: Request) -> Any:
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise ApiError(415, f"Content-Encoding {encoding!r} is not supported: send the body "
                                "uncompressed")
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise ApiError(413, f"request body larger than {limit} bytes")
        try:
            body = await _within(_body(request, limit), self.config.body_timeout_s)
        except ClientDisconnect as e:
            raise ApiError(400, "the client disconnected while sending the body") from e
        except asyncio.TimeoutError as e:  # (TimeoutError itself from Python 3.11)
            raise ApiError(408, f"the request body did not arrive within "
                                f"{self.config.body_timeout_s:g} s",
                           headers={"Connection": "close"}) from e
        try:
            return json.loads(body.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ApiError(400, f"the request body is not valid UTF-8: {e}") from e
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from e

    def _encode(self, req: ParsedRequest, messages: Any) -> list[list[int]]:
        """The token ids of each of the request's prompts (chat: the rendered messages)."""
        tok = self.engine.tokenizer
        try:
            if req.chat:
                opt = req.options
                text = tok.apply_chat_template(
                    messages, add_generation_prompt=opt.add_generation_prompt,
                    continue_final_message=opt.continue_final_message,
                    template_kwargs=opt.template_kwargs)
                return [tok.encode(text, add_special_tokens=opt.add_special_tokens)]
            return [tok.encode(p, add_special_tokens=req.options.add_special_tokens)
                    if isinstance(p, str) else p for p in req.prompts]
        except (TokenizerError, TypeError) as e:
            raise ApiError(400, f"cannot tokenize the input: {e}",
                           "messages" if req.chat else "prompt") from e

    def _truncated(self, ids: list[int], keep: int | None) -> list[int]:
        """The prompt's last `keep` tokens (truncate_prompt_tokens; -1: the context's size)."""
        if keep is None:
            return ids
        context = self.engine.max_seq_len
        if keep == -1:
            keep = context
        if keep > context:
            raise ApiError(400, f"truncate_prompt_tokens={keep} is greater than the context of "
                                f"{context} tokens", "truncate_prompt_tokens")
        return ids[-keep:]

    def _limit(self, req: ParsedRequest, prompt_len: int, where: str = "") -> int:
        """The request's max_new_tokens, checked against the context; `where` begins the
        messages (a batch's "prompt[i]: ")."""
        context = self.engine.max_seq_len
        room = context - prompt_len
        param = "messages" if req.chat else "prompt"
        if prompt_len == 0:
            raise ApiError(400, f"{where}the prompt is empty (it encodes to no tokens)", param)
        if room < 1:
            raise ApiError(400, f"{where}the prompt has {prompt_len} tokens but the context is "
                                f"{context} tokens and at least one new token must fit", param,
                           code="context_length_exceeded")
        if req.max_tokens is None:
            return room if req.chat else min(DEFAULT_COMPLETION_TOKENS, room)
        if req.max_tokens > room:
            raise ApiError(400, f"{where}max_tokens={req.max_tokens} plus the prompt's "
                                f"{prompt_len} tokens exceeds the context of {context} tokens",
                           "max_tokens", code="context_length_exceeded")
        return req.max_tokens

    def _params(self, req: ParsedRequest, prompt_len: int, where: str = "") -> SamplingParams:
        """The request's sampling parameters for a prompt of prompt_len tokens."""
        limit = self._limit(req, prompt_len, where)
        if req.params.min_tokens > limit:  # in the API's words (max_tokens, and its default)
            given = "" if req.max_tokens is not None else (
                " (its default here: the request gives none)")
            raise ApiError(400, f"{where}min_tokens={req.params.min_tokens} exceeds "
                                f"max_tokens={limit}{given}", "min_tokens")
        try:
            return dataclasses.replace(req.params, max_new_tokens=limit)  # checks min_tokens
        except SamplingParamsError as e:
            raise ApiError(400, f"{where}{e}", api_param(e.param, req)) from e

    def _submit_all(self, kept: list[list[int]], req: ParsedRequest) -> list[RequestStream]:
        """Each prompt's request (its ids as run), all queued or none: every prompt checked by
        the server and the engine first (a batch's errors begin "prompt[i]: ")."""
        cap = self.engine.scheduler.capacity
        if len(kept) > 1 and cap is not None and len(kept) > cap:
            raise ApiError(400, f"a batch of {len(kept)} prompts exceeds this server's "
                                f"{cap} requests in flight", "prompt")
        params = [self._params(req, len(ids), _where(i, len(kept))) for i, ids in enumerate(kept)]
        labels = [_where(i, len(kept)).removesuffix(": ") for i in range(len(kept))]
        try:
            return self.engine.submit_all(list(zip(kept, params, strict=True)),
                                          labels if len(kept) > 1 else None)
        except (RequestError, OutOfPagesError) as e:
            raise ApiError(400, str(e), "messages" if req.chat else "prompt") from e
        except SamplingParamsError as e:  # beyond the backend, the vocabulary or max_tokens
            raise ApiError(400, str(e), api_param(e.param, req)) from e
        except (QueueFullError, EngineClosedError) as e:
            raise self._ended(e) from e

    async def _generate(self, request: Request, chat: bool) -> Response:
        self._authorize(request)
        body = await self._read_json(request)
        req, messages = parse_request(body, chat=chat, model_name=self.config.model_name)
        if req.chat or any(isinstance(p, str) for p in req.prompts):  # off the event loop
            encoded = await asyncio.to_thread(self._encode, req, messages)
        else:  # token ids: nothing to run on a thread
            encoded = self._encode(req, messages)
        kept = [self._truncated(ids, req.truncate) for ids in encoded]
        rid, created = response_id(chat, req.request_id), int(time.time())
        shapes = [self._shape(req, ids, len(whole), i, rid, created)  # before any request runs
                  for i, (ids, whole) in enumerate(zip(kept, encoded, strict=True))]
        streams = self._submit_all(kept, req)

        def cancel() -> None:
            for stream in streams:
                stream.cancel()

        if req.stream:
            return EventStreamResponse(
                _sse_events(streams, shapes, req.include_usage, self._ended, req.continuous_usage),
                on_close=cancel)
        try:
            outs = await race_disconnect(_results(streams), request.receive)
        except ClientGone:
            return Response(status_code=499)
        except (EngineClosedError, QueueFullError) as e:
            raise self._ended(e) from e
        finally:
            cancel()
        for i, out in enumerate(outs):
            if out is not None and out.error is not None:
                raise _failed(out.error, _where(i, len(outs)))
        done = [out for out in outs if out is not None]  # (all: none failed)
        return JSONResponse(merged([shape.full(out) for shape, out in zip(shapes, done,
                                                                          strict=True)], done))

    def _shape(self, req: ParsedRequest, ids: list[int], whole: int, prompt: int, rid: str,
               created: int) -> ResponseShape:
        """The response shape of the request of prompt `prompt` (its position in the batch):
        its ids as run, `whole` tokens before truncation; its choices after the n of each
        prompt before it; the response's id and creation time."""
        shape = ResponseShape(req.chat, self.config.model_name, id=rid, created=created,
                              token_ids=req.token_ids, first_index=prompt * req.params.n)
        if req.params.logprobs is not None or req.prompt_logprobs is not None:
            formatter = LogprobsFormatter(self.engine.tokenizer, req.tokens_as_ids,
                                          req.params.skip_special_tokens)
            if req.params.logprobs is not None:
                shape.logprobs, shape.logprobs_k = formatter, req.params.logprobs
            if req.prompt_logprobs is not None:
                shape.prompt, shape.prompt_k = formatter, req.prompt_logprobs
        if req.echo:  # the prompt as run: a truncated one as its kept tokens read
            text = req.prompts[prompt]
            shape.echo = (text if isinstance(text, str) and len(ids) == whole
                          else self.engine.tokenizer.decode(ids, skip_special_tokens=False))
        return shape

    def _ended(self, exc: EngineClosedError | QueueFullError) -> ApiError:
        """The error response of a request the engine ended without running it."""
        if isinstance(exc, QueueFullError):
            wait = self.engine.metrics.retry_after_s(self.config.retry_after_s)
            return ApiError(429, str(exc), kind="rate_limit_error", code="queue_full",
                            headers={"Retry-After": str(wait)})
        return ApiError(503, str(exc), kind="server_error", headers=self._retry())


def _where(prompt: int, count: int) -> str:
    """How the messages of a batch of `count` prompts begin for prompt `prompt` ("prompt[i]: ");
    "" for a lone prompt."""
    return f"prompt[{prompt}]: " if count > 1 else ""


def _failed(failure: RequestFailure, where: str = "") -> ApiError:
    """The error response of a request that failed on its own while it ran (400: what failed
    is the request's, e.g. its grammar); `where` begins the message (a batch's "prompt[i]: ")."""
    return ApiError(400, where + failure.message,
                    api_param(failure.param) if failure.param else None)


async def _within(work: Coroutine[Any, Any, T], timeout_s: float) -> T:
    """`await work`, or TimeoutError past `timeout_s`: under asyncio.timeout (Python 3.11+) it
    runs in the handler's task; asyncio.wait_for makes it a task of its own before 3.12 (an event
    loop iteration to start it, another to resume the handler)."""
    if sys.version_info < (3, 11):
        return await asyncio.wait_for(work, timeout_s)
    async with asyncio.timeout(timeout_s):
        return await work


async def _body(request: Request, limit: int) -> bytearray:
    """The request's body; 413 past `limit` bytes."""
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ApiError(413, f"request body larger than {limit} bytes")
    return body


async def _results(streams: list[RequestStream]) -> list[RequestOutput | None]:
    """The finished outputs of a response's requests, in order; a batch's until one has failed
    (those not finished by then: None)."""
    if len(streams) == 1:
        return [await streams[0].result()]
    tasks = {asyncio.ensure_future(stream.result()): i for i, stream in enumerate(streams)}
    outs: list[RequestOutput | None] = [None] * len(streams)
    try:
        waiting = set(tasks)
        while waiting:
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                out = outs[tasks[task]] = task.result()
                if out.error is not None:
                    return outs
        return outs
    finally:
        for task in tasks:
            task.cancel()


class _Failed(Exception):
    """A request of a streamed response failed: `event` is its error's SSE event."""

    def __init__(self, event: bytes) -> None:
        super().__init__("request failed")
        self.event = event


async def _sse_events(streams: list[RequestStream], shapes: list[ResponseShape],
                      include_usage: bool,
                      ended: Callable[[EngineClosedError | QueueFullError], ApiError],
                      continuous: bool = False) -> AsyncIterator[bytes]:
    """The SSE chunks of a streamed response: of its one request, or of a completions batch's
    requests as they come (each chunk names its choice's index); an error event instead of the
    rest where a request failed (`RequestFailure`) or the engine ended it (`ended` makes its
    error); with include_usage, a last chunk of the usage of them all."""
    outs: list[RequestOutput] = []
    chunks = [_request_events(stream, shape, include_usage, continuous, outs,
                              _where(i, len(streams)))
              for i, (stream, shape) in enumerate(zip(streams, shapes, strict=True))]
    try:
        async for chunk in (chunks[0] if len(chunks) == 1 else _interleaved(chunks)):
            yield chunk
        if include_usage:
            yield shapes[0].usage_chunk(outs)
    except _Failed as failure:
        yield failure.event
    except (EngineClosedError, QueueFullError) as e:
        yield sse(ended(e).body())
    yield SSE_DONE


async def _interleaved(sources: list[AsyncIterator[bytes]]) -> AsyncIterator[bytes]:
    """The items of several async iterators as each produces them; the first error raised by
    any of them ends it (the others' tasks are cancelled)."""
    queue: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue()

    async def pump(source: AsyncIterator[bytes]) -> None:
        try:
            async for item in source:
                await queue.put((False, item))
            await queue.put((True, None))
        except Exception as e:  # handed to the consumer
            await queue.put((True, e))

    tasks = [asyncio.create_task(pump(source)) for source in sources]
    try:
        left = len(tasks)
        while left:
            done, item = await queue.get()
            if not done:
                yield item
                continue
            left -= 1
            if item is not None:
                raise item
    finally:
        for task in tasks:
            task.cancel()


async def _request_events(stream: RequestStream, shape: ResponseShape, include_usage: bool,
                          continuous: bool, outs: list[RequestOutput],
                          where: str = "") -> AsyncIterator[bytes]:
    """The SSE chunks of one request's choices; its finished output appended to `outs`;
    `_Failed` where it failed (its message begins with `where`). continuous (vLLM's
    continuous_usage_stats): every chunk of a choice carries the usage so far (the prompt and
    that choice's tokens), not null."""
    started: set[int] = set()  # choices whose first chunk went out

    def live(index: int) -> dict | None:
        return usage_so_far(stream.seq.out, stream.seq.group[index].out) if continuous else None

    async for ev in stream:
        if ev.finished and ev.output is not None and ev.output.error is not None:
            raise _Failed(sse(_failed(ev.output.error, where).body()))
        if ev.choice_finish == "error":  # another choice of a failed request: its error
            continue  # event follows (no "error" finish_reason, which OpenAI does not have)
        if not started and shape.echo is not None:  # the prompt's logprobs are known by now
            for index in range(stream.seq.params.n):
                yield shape.echo_chunk(stream.seq.out, usage_field=include_usage,
                                       index=index, usage_now=live(index))
        first = ev.choice not in started
        ids = shape.token_ids and (first or ev.token_ids)
        if ev.text or ev.logprobs or (first and shape.chat) or ids:
            prompt = stream.seq.out.prompt_token_ids if first and shape.echo is None else None
            yield shape.chunk(ev.text, first=first, usage_field=include_usage,
                              logprobs=ev.logprobs, index=ev.choice, token_ids=ev.token_ids,
                              prompt_ids=prompt, usage_now=live(ev.choice))
        started.add(ev.choice)
        if ev.choice_finish is not None:
            cut = stream.seq.group[ev.choice].out.cut_logprobs if shape.token_ids else []
            yield shape.chunk("", ev.choice_finish, usage_field=include_usage,
                              stop_reason=ev.choice_stop, logprobs=cut,
                              index=ev.choice, usage_now=live(ev.choice))
        if ev.finished:
            assert ev.output is not None
            outs.append(ev.output)


def _error_response(err: ApiError) -> Response:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return _error_response(ApiError(exc.status_code, str(exc.detail), kind=kind,
                                    headers=dict(exc.headers or {})))


def create_app(engine: AsyncEngine, config: ServerConfig) -> Starlette:
    """The ASGI app serving `engine` under `config`."""
    h = _Handlers(engine, config)
    routes = [
        Route("/health", h.health, methods=["GET"]),
        Route("/metrics", h.metrics, methods=["GET"]),
        Route("/v1/models", h.models, methods=["GET"]),
        Route("/v1/models/{model:path}", h.model, methods=["GET"]),
        Route("/v1/completions", h.completions, methods=["POST"]),
        Route("/v1/chat/completions", h.chat, methods=["POST"]),
    ]
    return Starlette(routes=routes,
                     exception_handlers={ApiError: _api_error, HTTPException: _http_error})
