"""The OpenAI-compatible HTTP server: a Starlette app in front of an Engine, served by uvicorn on uvloop.

Routes: POST /v1/chat/completions, POST /v1/completions (serving_chat.py, serving_completion.py), GET
/v1/models, GET /health (200 only while the engine can serve), GET /metrics (Prometheus, metrics.py), GET
/server_info. Bodies are decoded by msgspec (protocol.py), answers encoded by orjson, streams sent as SSE.
Every error is an OpenAI error body with the right status. A client that leaves aborts its engine requests.
The process around it (engine start, uvicorn, graceful SIGTERM) is in launch_server.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from tokenizers import Tokenizer

from baleen.api.chat_template import ChatTemplate
from baleen.api.errors import ApiError
from baleen.api.metrics import CONTENT_TYPE, FrontendMetrics
from baleen.api.protocol import model_list
from baleen.api.reasoning import REASONING_PARSERS
from baleen.api.tool_parser import TOOL_CALL_PARSERS
from baleen.messages import RequestOutput, SamplingParams
from baleen.model.logit_processors import LogitProcessorRegistry

log = logging.getLogger("baleen.server")
T = TypeVar("T")
CHAT_ROUTE, COMPLETION_ROUTE = "/v1/chat/completions", "/v1/completions"
_ROUTES = (CHAT_ROUTE, COMPLETION_ROUTE, "/v1/models", "/health", "/metrics", "/server_info")
_OPEN_ROUTES = ("/health", "/metrics")  # answered without the API key, for probes and scrapers


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """The HTTP side of `baleen serve`: where to listen, who may call, how to render and parse."""

    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    served_model_name: str | None = None  # None: the model path
    chat_template: str | None = None  # a built-in name or a .jinja path; None: the checkpoint's
    reasoning_parser: str | None = None
    tool_call_parser: str | None = None
    max_request_bytes: int = 32 << 20
    graceful_shutdown_s: float = 5.0
    retry_after_s: int = 1
    log_level: str = "info"
    # When the engine dies (a worker process died, an engine actor failed): False exits the server with code 1
    # within seconds, for a supervisor to restart it; True keeps it up, answering 503 (/health included).
    stay_up_after_engine_death: bool = False

    def __post_init__(self) -> None:
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"--reasoning-parser {self.reasoning_parser!r}: choose one of {list(REASONING_PARSERS)}")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"--tool-call-parser {self.tool_call_parser!r}: choose one of {list(TOOL_CALL_PARSERS)}")
        if self.max_request_bytes < 1:
            raise ValueError(f"the request size limit must be at least 1 byte, got {self.max_request_bytes}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if self.graceful_shutdown_s < 0:
            raise ValueError(f"the graceful shutdown timeout must be >= 0 s, got {self.graceful_shutdown_s}")


class EngineClient(Protocol):
    """What the server uses of an Engine (a fake with this surface serves the HTTP benchmark and tests)."""

    tokenizer: Tokenizer
    model_path: str
    max_context_len: int
    metrics: dict[str, float]
    error: str | None

    @property
    def healthy(self) -> bool: ...

    def generate(self, prompt: str | Sequence[int], sampling: SamplingParams | None = None, *,
                 rid: str | None = None) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, rid: str) -> None: ...

    def info(self) -> dict[str, Any]: ...


class ServerState:
    """Everything a route needs: the engine, the server config, template, processor registry, metrics."""

    def __init__(self, engine: EngineClient, config: ServerConfig, template: ChatTemplate,
                 processors: LogitProcessorRegistry | None) -> None:
        self.engine = engine
        self.config = config
        self.template = template
        self.processors = processors  # None: custom logit processors are disabled
        self.tokenizer = engine.tokenizer
        # token id -> its text, cached: logprobs name every token and its alternatives
        self.token_text: Callable[[int], str] = functools.lru_cache(maxsize=1 << 18)(
            lambda token_id: engine.tokenizer.decode([token_id], skip_special_tokens=False))
        self.model_name = config.served_model_name or engine.model_path
        self.metrics = FrontendMetrics(self.model_name, lambda: engine.metrics, lambda: self.can_serve)
        self.model_aliases = {self.model_name, engine.model_path, "default"}
        self.inflight: set[str] = set()  # engine request ids being served
        self.draining = False  # set at shutdown: /health answers 503

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt may hold: the model's vocabulary (it may be larger than the tokenizer's)."""
        model_config = getattr(self.engine, "model_config", None)
        return int(getattr(model_config, "vocab_size", 0) or self.tokenizer.get_vocab_size())

    @property
    def can_serve(self) -> bool:
        """Whether new requests can be taken (what /health reports)."""
        return self.engine.healthy and not self.draining

    def check_model(self, model: str) -> None:
        """ApiError(404) unless `model` names the served model (its name, its path, or "default")."""
        if model not in self.model_aliases:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def check_can_serve(self) -> None:
        """ApiError(503) while the engine is dead or the server is draining."""
        if not self.can_serve:
            reason = self.engine.error or ("the server is shutting down" if self.draining else "the engine is closed")
            raise ApiError(503, f"the engine cannot serve requests: {reason}")

    def check_processor(self, params: SamplingParams) -> None:
        """A named logit processor must be registered and accept its custom_params (built here, never run)."""
        name = params.custom_logit_processor
        if name is None:
            return
        if self.processors is None:
            raise ApiError(400, "custom logit processors are disabled on this server (start it with "
                           "--enable-custom-logit-processor)", param="custom_logit_processor")
        if name not in self.processors.names():
            raise ApiError(400, f"unknown custom_logit_processor {name!r}; this server has {self.processors.names()}",
                           param="custom_logit_processor")
        # NOTE: a processor that rejects its params inside the worker would fail the whole engine, so the
        # server builds it once here (operator code, with the client's plain data) and refuses bad params.
        try:
            self.processors.create(name, params.custom_params, self.tokenizer)
        except ValueError as e:
            raise ApiError(400, str(e), param="custom_params") from None

    async def abort_all(self) -> None:
        """Abort every engine request in flight; each stream then ends with finish_reason "abort"."""
        for rid in list(self.inflight):
            with contextlib.suppress(Exception):
                await self.engine.abort(rid)


# ---- request plumbing shared by the generation routes ------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; ApiError(413) as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length", "")
    size = int(declared) if declared.isdigit() else 0  # a body declared too large is refused unread
    chunks: list[bytes] = []
    if size <= limit:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                break
            chunks.append(chunk)
    if size > limit:
        raise ApiError(413, f"the request body has at least {size} bytes, over this server's limit of {limit} "
                       "bytes", code="request_too_large")
    return b"".join(chunks)


def check_context(prompt_len: int, max_new_tokens: int | None, max_context_len: int, *, field: str) -> None:
    """ApiError(400), giving both numbers, when the prompt plus max tokens cannot fit in the context."""
    if max_new_tokens is None:
        if prompt_len >= max_context_len:
            raise ApiError(400, f"this model's maximum context length is {max_context_len} tokens, but the prompt "
                           f"has {prompt_len} tokens, which leaves no room to generate; shorten it",
                           param="messages" if field != "max_tokens" else "prompt", code="context_length_exceeded")
        return
    if prompt_len + max_new_tokens > max_context_len:
        raise ApiError(400, f"this model's maximum context length is {max_context_len} tokens, but you requested "
                       f"{prompt_len + max_new_tokens} tokens ({prompt_len} in the prompt, {max_new_tokens} for "
                       f"{field}); shorten the prompt or lower {field}", param=field, code="context_length_exceeded")


def engine_error(out: RequestOutput) -> ApiError:
    """The HTTP error for an engine output with finish_reason "error" (503s get a Retry-After header)."""
    message = out.error or "the engine failed the request"
    if out.error_kind == "invalid":
        return ApiError(400, message)
    if out.error_kind == "overloaded":
        return ApiError(503, message, code="overloaded")
    return ApiError(500, message)


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (aborting its engine requests): ClientGone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if task.cancelled():
        raise ClientGone()
    return task.result()


class Generation:
    """The engine requests behind one HTTP request, one per choice: started, merged and aborted together."""

    def __init__(self, state: ServerState, route: str, requests: Sequence[tuple[list[int], SamplingParams]],
                 rid_prefix: str, started: float) -> None:
        self.state, self.route, self.started = state, route, started
        self.rids = [f"{rid_prefix}-{i}" for i in range(len(requests))]
        self._gens = [state.engine.generate(ids, params, rid=rid) for rid, (ids, params) in zip(self.rids, requests)]
        self._last: list[RequestOutput | None] = [None] * len(requests)  # latest output per choice
        self._last_token_at = [started] * len(requests)  # when each choice's latest tokens arrived
        self._pumps: list[asyncio.Future[None]] = []  # n > 1: one task per choice feeding the merge

    async def first(self) -> list[RequestOutput]:
        """Each choice's first output (so an error can still become an HTTP status); ApiError on an error."""
        self.state.check_can_serve()
        self.state.inflight.update(self.rids)
        from baleen.actors.engine import EngineDead

        try:
            firsts = list(await asyncio.gather(*(anext(g) for g in self._gens)))
        except EngineDead as e:  # the engine died between the health check and the submission
            raise ApiError(503, f"the engine cannot serve requests: {e}") from None
        self.state.metrics.observe_ttft(self.route, time.perf_counter() - self.started)
        for i, out in enumerate(firsts):
            self._note(i, out)
        return firsts

    async def rest(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """The outputs after the first ones, as (choice index, output), merged in arrival order."""
        live = [i for i, last in enumerate(self._last) if last is None or not last.finished]
        if len(live) == 1:
            async for out in self._gens[live[0]]:
                self._note(live[0], out)
                yield live[0], out
            return
        queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()
        self._pumps = [asyncio.ensure_future(self._pump(i, queue)) for i in live]
        for _ in live:
            while True:
                i, out = await queue.get()
                self._note(i, out)
                yield i, out
                if out.finished:
                    break

    async def _pump(self, i: int, queue: asyncio.Queue[tuple[int, RequestOutput]]) -> None:
        try:
            async for out in self._gens[i]:
                queue.put_nowait((i, out))
        except Exception as e:  # never leave the merge waiting for a finish that cannot come
            queue.put_nowait((i, RequestOutput(rid=self.rids[i], finish_reason="error", error=str(e),
                                               error_kind="internal")))

    def _note(self, i: int, out: RequestOutput) -> None:
        now, metrics = time.perf_counter(), self.state.metrics
        first, failed = self._last[i] is None, out.finish_reason == "error"
        if first and not failed:
            metrics.observe_first_token(now - self.started)
        elif not first and out.token_ids:
            metrics.observe_inter_token(now - self._last_token_at[i], len(out.token_ids))
        if first or out.token_ids:
            self._last_token_at[i] = now
        self._last[i] = out
        if out.finished:
            metrics.observe_finished(out.finish_reason or "", out.prompt_tokens, out.completion_tokens,
                                     None if failed else now - self.started)

    async def aclose(self) -> None:
        """Abort whatever has not finished (the engine frees its pages) and forget the request ids."""
        for pump in self._pumps:  # a cancelled pump closes its engine stream, which sends the abort
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for last in self._last:
            if last is not None and not last.finished:  # the client left: count what it was given
                self.state.metrics.observe_finished("abort", last.prompt_tokens, last.completion_tokens)
        for gen in self._gens:
            close = getattr(gen, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
        self.state.inflight.difference_update(self.rids)


@dataclass
class Collected:
    """One choice's whole output, gathered for a non-streamed answer."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    last: RequestOutput | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        self.top_logprobs += out.top_logprobs or []
        self.last = out


async def collect(generation: Generation, firsts: Sequence[RequestOutput]) -> list[Collected]:
    """Every choice's whole output; ApiError when the engine failed one of them."""
    results = [Collected() for _ in firsts]

    def add(i: int, out: RequestOutput) -> None:
        if out.finish_reason == "error":
            raise engine_error(out)
        results[i].add(out)

    for i, out in enumerate(firsts):
        add(i, out)
    async for i, out in generation.rest():
        add(i, out)
    return results


# ---- responses -----------------------------------------------------------------------------------------


class JSONResponse(Response):
    """A JSON response encoded by orjson."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(error: ApiError, retry_after_s: int = 1) -> JSONResponse:
    """The OpenAI error body with its status; 503 says when to retry, 401 which scheme to use."""
    headers = {503: {"Retry-After": str(retry_after_s)}, 401: {"WWW-Authenticate": "Bearer"}}.get(error.status)
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def sse(chunk: dict[str, Any]) -> bytes:
    """One SSE event holding a JSON chunk."""
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def sse_response(state: ServerState, frames: AsyncIterator[bytes]) -> Response:
    """A streamed answer; a disconnect cancels `frames` (whose cleanup aborts the engine requests)."""
    from sse_starlette.sse import EventSourceResponse

    # At shutdown sse-starlette would cut streams at once; instead they run until the server's own
    # grace period aborts their requests, so each still ends with a finish_reason and [DONE].
    return EventSourceResponse(frames, shutdown_grace_period=state.config.graceful_shutdown_s + 2.0)


# ---- the app ---------------------------------------------------------------------------------------------


class _Frontend:
    """Outermost ASGI layer: the API key check, and HTTP counters and latency for every request."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 499  # 499: the client left before any answer
        path = scope["path"]
        route = path if path in _ROUTES else "/v1/models" if path.startswith("/v1/models/") else "other"

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics = self.state.metrics
        metrics.in_flight.inc()
        try:
            if self._authorized(scope, route):
                await self.app(scope, receive, send_status)
            else:
                error = ApiError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                await error_response(error)(scope, receive, send_status)
        finally:
            metrics.in_flight.dec()
            metrics.observe_request(scope["method"], route, status, time.perf_counter() - started)

    def _authorized(self, scope: Scope, route: str) -> bool:
        key = self.state.config.api_key
        if key is None or route in _OPEN_ROUTES or scope["method"] == "OPTIONS":
            return True
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


async def _guarded(answer: Awaitable[Response]) -> Response:
    """A route's answer; a bug becomes a logged HTTP 500 (Starlette's last-resort handler would also drop the
    connection)."""
    try:
        return await answer
    except ApiError:
        raise
    except Exception as e:
        log.exception("request failed")
        return error_response(ApiError(500, f"internal server error: {type(e).__name__}: {e}"))


def create_app(state: ServerState) -> Starlette:
    """The Starlette app serving `state.engine` (which the caller starts and closes)."""
    # Imported here: the route modules import this module's plumbing.
    from baleen.api.serving_chat import create_chat_completion
    from baleen.api.serving_completion import create_completion

    async def chat(request: Request) -> Response:
        return await _guarded(create_chat_completion(state, request))

    async def completion(request: Request) -> Response:
        return await _guarded(create_completion(state, request))

    async def models(request: Request) -> Response:
        return JSONResponse(model_list([state.model_name]))

    async def model(request: Request) -> Response:
        state.check_model(request.path_params["name"])
        return JSONResponse(model_list([state.model_name])["data"][0])

    async def health(request: Request) -> Response:
        state.check_can_serve()
        return Response(status_code=200)

    async def metrics(request: Request) -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    async def server_info(request: Request) -> Response:
        config = {k: v for k, v in asdict(state.config).items() if k != "api_key"}
        return JSONResponse({**state.engine.info(), "server_config": config, "served_model_name": state.model_name,
                             "chat_template": state.template.name,
                             "custom_logit_processors": state.processors.names() if state.processors else None})

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc, state.config.retry_after_s)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {404: f"no route {request.url.path!r}; see /v1/chat/completions, /v1/completions, /v1/models",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        response = error_response(ApiError(exc.status_code, message), state.config.retry_after_s)
        response.headers.update(exc.headers or {})
        return response

    async def on_crash(request: Request, exc: Exception) -> Response:
        return error_response(ApiError(500, f"internal server error: {type(exc).__name__}: {exc}"))

    routes = [
        Route(CHAT_ROUTE, chat, methods=["POST"]),
        Route(COMPLETION_ROUTE, completion, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/server_info", server_info, methods=["GET"]),
    ]
    handlers = {ApiError: on_api_error, HTTPException: on_http_error, Exception: on_crash}
    return Starlette(routes=routes, middleware=[Middleware(_Frontend, state=state)],
                     exception_handlers=handlers)  # type: ignore[arg-type]
