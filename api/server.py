"""The OpenAI-compatible HTTP server: a Starlette app in front of an Engine, served by uvicorn on uvloop.

Routes: POST /v1/chat/completions, POST /v1/completions (serving_chat.py, serving_completion.py), GET
/v1/models, GET /health (200 only while the engine can serve), GET /metrics (Prometheus, metrics.py), GET
/server_info; SGLang's native API (serving_native.py): POST /generate, GET /get_model_info, GET /get_server_info,
GET|POST /flush_cache, GET /health_generate. Bodies are decoded by msgspec (protocol.py, native_protocol.py),
answers encoded by orjson, streams sent as SSE.
Every error is an OpenAI error body with the right status. A client that leaves aborts its engine requests.
What the routes share lives in state.py (ServerState), generation.py (the engine requests of one HTTP request)
and responses.py; this module only assembles the app. The process around it (engine start, uvicorn, graceful
SIGTERM) is in launch_server.py. Nothing here imports torch.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from baleen.api import serving_chat, serving_completion, serving_native
from baleen.api.bodies import model_list
from baleen.api.errors import ApiError
from baleen.api.metrics import CONTENT_TYPE
from baleen.api.responses import JSONResponse, error_response
from baleen.api.state import ServerState

log = logging.getLogger("baleen.server")
_NATIVE_ROUTES = (serving_native.ROUTE, "/get_model_info", "/get_server_info", "/flush_cache", "/health_generate")
_ROUTES = (serving_chat.ROUTE, serving_completion.ROUTE, "/v1/models", "/health", "/metrics", "/server_info",
           *_NATIVE_ROUTES)
_OPEN_ROUTES = ("/health", "/health_generate", "/metrics")  # answered without the API key (probes, scrapers; as SGLang)


# ---- the app ---------------------------------------------------------------------------------------------


_Handler = Callable[[Request], Awaitable[Response]]


class _Frontend:
    """Outermost ASGI layer: the API key check, HTTP counters and latency for every request, and the generation
    routes' POSTs handed straight to their handlers.

    NOTE: a POST to a route in `direct` skips the Starlette app (its error middleware, router, exception middleware
    and per-route wrapper: ~16 us of the ~80 us the frontend spends on a streamed request before its first event,
    measured in process). Its handler turns every error into a response itself (`_guarded`), so what Starlette's
    layers would add there is only the ApiError -> error body mapping, done here."""

    def __init__(self, app: ASGIApp, state: ServerState, direct: dict[str, _Handler]) -> None:
        self.app, self.state, self.direct = app, state, direct

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
            if not self._authorized(scope, route):
                error = ApiError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                await error_response(error)(scope, receive, send_status)
            elif scope["method"] == "POST" and (handler := self.direct.get(path)) is not None:
                try:
                    response = await handler(Request(scope, receive))
                except ApiError as e:
                    response = error_response(e, self.state.config.retry_after_s)
                await response(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
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


def create_app(state: ServerState) -> ASGIApp:
    """The ASGI app serving `state.engine` (which the caller starts and closes): the Starlette app behind
    `_Frontend`."""
    async def chat(request: Request) -> Response:
        return await _guarded(serving_chat.create_chat_completion(state, request))

    async def completion(request: Request) -> Response:
        return await _guarded(serving_completion.create_completion(state, request))

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

    async def server_info(request: Request) -> Response:  # also SGLang's /get_server_info
        config = {k: v for k, v in asdict(state.config).items() if k != "api_key"}
        return JSONResponse({**state.engine.info(), "server_config": config, "served_model_name": state.model_name,
                             "chat_template": state.template.name,
                             "custom_logit_processors": state.processors.names() if state.processors else None,
                             **serving_native.server_info(state)})

    # ---- SGLang's native API
    async def generate(request: Request) -> Response:
        return await _guarded(serving_native.generate(state, request))

    async def get_model_info(request: Request) -> Response:
        return JSONResponse(serving_native.model_info(state))

    async def flush_cache(request: Request) -> Response:
        return await serving_native.flush_cache(state)

    async def health_generate(request: Request) -> Response:
        return await serving_native.health_generate(state)

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc, state.config.retry_after_s)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {404: f"no route {request.url.path!r}; see /v1/chat/completions, /v1/completions, /v1/models, "
                        "/generate",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        response = error_response(ApiError(exc.status_code, message), state.config.retry_after_s)
        response.headers.update(exc.headers or {})
        return response

    async def on_crash(request: Request, exc: Exception) -> Response:
        return error_response(ApiError(500, f"internal server error: {type(exc).__name__}: {exc}"))

    routes = [
        Route(serving_chat.ROUTE, chat, methods=["POST"]),
        Route(serving_completion.ROUTE, completion, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/server_info", server_info, methods=["GET"]),
        Route(serving_native.ROUTE, generate, methods=["POST", "PUT"]),
        Route("/get_model_info", get_model_info, methods=["GET"]),
        Route("/get_server_info", server_info, methods=["GET"]),
        Route("/flush_cache", flush_cache, methods=["GET", "POST"]),
        Route("/health_generate", health_generate, methods=["GET"]),
    ]
    handlers = {ApiError: on_api_error, HTTPException: on_http_error, Exception: on_crash}
    app = Starlette(routes=routes, exception_handlers=handlers)  # type: ignore[arg-type]
    return _Frontend(app, state, {serving_chat.ROUTE: chat, serving_completion.ROUTE: completion,
                                  serving_native.ROUTE: generate})
