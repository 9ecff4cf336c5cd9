"""Bodies in and out of the HTTP layer: the request body under a size limit, JSON and error responses (orjson),
and SSE streams."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from baleen.api.errors import ApiError

SSE_DONE = b"data: [DONE]\n\n"


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


def sse_response(frames: AsyncIterator[bytes], graceful_shutdown_s: float, *, ping_s: float = 0.0) -> Response:
    """A streamed answer; a disconnect cancels `frames` (whose cleanup aborts the engine requests).

    ping_s: send a `: ping` comment after that many seconds without data (keeps proxies from closing idle streams);
    0 sends none. SGLang's and vLLM's benchmark clients read every non-empty line as `data:` JSON and fail a request
    on a comment, so the default is none, as those servers send.
    """
    from sse_starlette.sse import EventSourceResponse

    # At shutdown sse-starlette would cut streams at once; instead they run until the server's own
    # grace period aborts their requests, so each still ends with a finish_reason and [DONE].
    return EventSourceResponse(frames, shutdown_grace_period=graceful_shutdown_s + 2.0, ping=ping_s)
