"""Bodies in and out of the HTTP layer: the request body under a size limit, JSON and error responses (orjson),
and SSE streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

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


class SSEResponse(Response):
    """A text/event-stream answer of already-encoded SSE events; a disconnect cancels the stream (whose cleanup
    aborts the engine requests).

    NOTE: the events are sent from the handler's own task, as soon as each is produced: the first one (a request's
    first token) goes out without waiting for a task to start (sse-starlette's response ran four tasks per stream,
    each send under a lock and a cancel scope). Only the disconnect watcher, and the ping timer when asked for, are
    tasks. At shutdown a stream runs on until the server's grace period aborts its requests (launch_server.py), so
    each still ends with a finish_reason and [DONE].
    """

    media_type = "text/event-stream"

    def __init__(self, frames: AsyncIterator[bytes], ping_s: float = 0.0) -> None:
        self.frames = frames
        self.ping_interval = ping_s
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-store", "Connection": "keep-alive", "X-Accel-Buffering": "no"})
        self._last_send = 0.0  # loop time of the latest event sent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if scope.get("method") == "HEAD":  # headers only: the stream never starts
            await self._close_frames()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        loop = asyncio.get_running_loop()
        self._last_send = loop.time()
        pinger = asyncio.ensure_future(self._ping(send)) if self.ping_interval > 0 else None
        watch = DisconnectWatch(receive)
        try:
            with watch:
                async for frame in self.frames:
                    self._last_send = loop.time()
                    await send({"type": "http.response.body", "body": frame, "more_body": True})
        finally:
            if pinger is not None:
                pinger.cancel()
            await self._close_frames()  # a stream cancelled in a send has its generator suspended at a yield
        if not watch.gone:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _ping(self, send: Send) -> None:
        """A `: ping` comment once the stream has been silent for `ping_interval` seconds."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.0, self._last_send + self.ping_interval - loop.time()))
            if loop.time() - self._last_send >= self.ping_interval:
                self._last_send = loop.time()
                await send({"type": "http.response.body", "body": b": ping\n\n", "more_body": True})

    async def _close_frames(self) -> None:
        close = getattr(self.frames, "aclose", None)
        if close is not None:
            with anyio.CancelScope(shield=True):
                await close()


class DisconnectWatch:
    """`with DisconnectWatch(receive) as watch:` cancels the task running the block when the client disconnects;
    that cancellation ends at the block (it is consumed: `uncancel`), and `watch.gone` says it happened. A watcher
    task reads `receive`; the block itself runs in the caller's task (a task of its own would start only on the
    loop's next turn: time to first token)."""

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.gone = False
        self._watching = False

    def __enter__(self) -> DisconnectWatch:
        task = asyncio.current_task()
        assert task is not None, "DisconnectWatch runs in a task"
        self._task, self._watching = task, True
        self._watcher = asyncio.ensure_future(self._until_disconnected())
        self._watcher.add_done_callback(self._on_disconnect)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> bool:
        self._watching = False
        self._watcher.cancel()
        if not self.gone:
            return False
        self._task.uncancel()  # our own cancel, consumed here
        return exc_type is asyncio.CancelledError

    def _on_disconnect(self, watcher: asyncio.Future[None]) -> None:
        if self._watching and not watcher.cancelled() and watcher.exception() is None:
            self.gone = True
            self._task.cancel()

    async def _until_disconnected(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass


def sse_response(frames: AsyncIterator[bytes], *, ping_s: float = 0.0) -> SSEResponse:
    """A streamed answer of SSE events (`sse`, `SSE_DONE`); see SSEResponse.

    ping_s: send a `: ping` comment after that many seconds without data (keeps proxies from closing idle streams);
    0 sends none. SGLang's and vLLM's benchmark clients read every non-empty line as `data:` JSON and fail a request
    on a comment, so the default is none, as those servers send.
    """
    return SSEResponse(frames, ping_s)
