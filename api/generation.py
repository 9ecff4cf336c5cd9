"""The engine requests behind one HTTP request: started, merged, collected and aborted together.

A route makes one `Generation` per HTTP request (one engine request per choice), awaits `first()` (an error there
can still become an HTTP status), then streams `rest()` or `collect`s it, and always ends with `aclose()`, which
aborts what has not finished. `unless_disconnected` cancels the work when the client leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response

from baleen.actors.admission import EngineDead
from baleen.api.errors import ApiError, engine_error
from baleen.api.responses import SSE_DONE, DisconnectWatch, sse
from baleen.api.state import ServerState
from baleen.messages import RequestOutput, SamplingParams

T = TypeVar("T")


def per_choice(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n copies for n choices of one prompt; with a seed, choice k uses seed + k so the choices differ (as OpenAI's)."""
    if params.seed is None:
        return [params] * n
    return [params] + [msgspec.structs.replace(params, seed=params.seed + k) for k in range(1, n)]


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work` in this task; if the client disconnects first, cancel it (aborting its engine requests): ClientGone."""
    with DisconnectWatch(request.receive) as watch:
        result = await work
    if watch.gone:  # `work` ended by our own cancel (or swallowed it)
        raise ClientGone()
    return result


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
        try:
            if len(self._gens) == 1:  # in this task: gather would wrap it in a task of its own (a turn of the loop)
                firsts = [await anext(self._gens[0])]
            else:
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

    async def respond(self, request: Request, stream: Callable[[list[RequestOutput]], Response] | None,
                      whole: Callable[[list[Collected]], Response]) -> Response:
        """A route's answer: every choice's first output (an engine error becomes its HTTP status), then
        `stream(firsts)` (a streamed response, which owns the requests from then on) or `whole(results)`; 499 for
        a client that left meanwhile. The requests are aborted unless a stream took them over."""
        streaming = False
        try:
            firsts = await unless_disconnected(request, self.first())
            for out in firsts:
                if out.finish_reason == "error":
                    raise engine_error(out)
            if stream is not None:
                response = stream(firsts)
                streaming = True
                return response
            return whole(await unless_disconnected(request, collect(self, firsts)))
        except ClientGone:
            return Response(status_code=499)
        finally:
            if not streaming:
                await self.aclose()

    async def frames(self, firsts: Sequence[RequestOutput], frame: Callable[[int, RequestOutput], bytes | None],
                     tail: Callable[[], bytes | None] | None = None) -> AsyncIterator[bytes]:
        """A streamed answer's SSE events: `frame(i, out)` of every output (None: nothing to send); an engine error
        becomes its error event and ends the stream; else `tail()` (a usage chunk) follows the last; then [DONE].
        The requests are aborted however the stream ends (a client that leaves cancels it)."""
        try:
            for i, out in enumerate(firsts):
                if (data := frame(i, out)) is not None:
                    yield data
            async for i, out in self.rest():
                if out.finish_reason == "error":
                    yield sse(engine_error(out).body())
                    break
                if (data := frame(i, out)) is not None:
                    yield data
            else:
                if tail is not None and (data := tail()) is not None:
                    yield data
            yield SSE_DONE
        finally:
            with anyio.CancelScope(shield=True):  # a cancelled stream must still abort (anyio re-cancels each await)
                await self.aclose()

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


@dataclass
class Collected:
    """One choice's whole output, gathered for a non-streamed answer."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    last: RequestOutput | None = None
    prompt_logprobs: list[float | None] | None = None  # with logprob_start_len: from the first output
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None

    def add(self, out: RequestOutput) -> None:
        if out.prompt_logprobs is not None:
            self.prompt_logprobs, self.prompt_top_logprobs = out.prompt_logprobs, out.prompt_top_logprobs
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
