"""Incremental detokenization: token ids in, UTF-8-safe text deltas out, stop strings caught across tokens."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from baleen.actors.actor import Actor
from baleen.actors.channel import Channel
from baleen.messages import (
    AbortRequest,
    Message,
    MetricsReport,
    RequestOutput,
    TokenDelta,
    TokenDeltas,
    WorkerReady,
)


@dataclass
class DecodeDelta:
    """What one batch of new tokens adds to a request's text."""

    text: str
    matched_stop: str | None = None  # set when a stop string ended the text (it is not included)


class RequestDecoder:
    """One request's incremental decoder.

    `tokenizers.DecodeStream` buffers tokens until they form whole UTF-8 characters, so a delta never holds
    half a character. Stop strings are matched on decoded text, so they are caught even when one spans
    several tokens; the last `max(len(stop)) - 1` characters are held back until they can no longer be the
    start of a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True, stop: list[str] | None = None):
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._stop = [s for s in (stop or []) if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._pending = ""  # decoded, not yet emitted
        self.stopped = False

    def feed(self, token_ids: list[int]) -> DecodeDelta:
        """Decode new tokens; once a stop string matched, everything after it is dropped."""
        if self.stopped or not token_ids:
            return DecodeDelta("")
        chunk = self._stream.step(self._tokenizer, token_ids)
        if chunk:
            self._pending += chunk
        if self._stop:
            hit = self._find_stop()
            if hit is not None:
                index, stop = hit
                text, self._pending, self.stopped = self._pending[:index], "", True
                return DecodeDelta(text, stop)
        cut = len(self._pending) - self._hold
        if cut <= 0:
            return DecodeDelta("")
        text, self._pending = self._pending[:cut], self._pending[cut:]
        return DecodeDelta(text)

    def finish(self) -> str:
        """Release the held-back tail when the request ends for another reason."""
        text, self._pending = ("" if self.stopped else self._pending), ""
        return text

    def _find_stop(self) -> tuple[int, str] | None:
        # The earliest match wins; among matches at one index, the longest stop string.
        best: tuple[int, str] | None = None
        for stop in self._stop:
            i = self._pending.find(stop)
            if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(stop) > len(best[1]))):
                best = (i, stop)
        return best


@dataclass
class RequestState:
    """The frontend's view of one request: its decoder and the queue `Engine.generate` reads."""

    decoder: RequestDecoder
    queue: asyncio.Queue[RequestOutput]
    finished: bool = False


class DetokenizerActor(Actor[list[TokenDelta], None]):
    """Turns the scheduler's token deltas into text outputs for the waiting `generate` calls."""

    def __init__(
        self,
        inbox: Channel,
        scheduler: Channel,
        requests: dict[str, RequestState],
        on_metrics: Callable[[dict[str, float]], None],
    ) -> None:
        super().__init__(inbox, name="detokenizer")
        self.scheduler = scheduler  # where stop-string matches are sent as aborts
        self.requests = requests
        self.on_metrics = on_metrics
        self._aborts: list[AbortRequest] = []

    def decide(self, messages: list[Message]) -> list[TokenDelta] | None:
        for msg in messages:
            match msg:
                case TokenDeltas():
                    for delta in msg.items:
                        self._deliver(delta)
                case MetricsReport():
                    self.on_metrics(msg.values)
                case WorkerReady():
                    pass
                case _:
                    raise TypeError(f"detokenizer got an unexpected {type(msg).__name__}")
        return None

    async def receive(self, block: bool) -> list[Message]:
        while self._aborts:
            await self.scheduler.send(self._aborts.pop(0))
        return await super().receive(block)

    def _deliver(self, delta: TokenDelta) -> None:
        state = self.requests.get(delta.rid)
        if state is None or state.finished:
            return  # aborted by the client, or already ended by a stop string
        d = state.decoder.feed(delta.token_ids)
        text, reason, matched = d.text, delta.finish_reason, delta.matched_stop
        if d.matched_stop is not None:
            reason, matched = "stop", d.matched_stop
            if delta.finish_reason is None:
                self._aborts.append(AbortRequest(delta.rid, "stop", d.matched_stop))
        elif reason is not None:
            text += state.decoder.finish()
        state.finished = reason is not None
        state.queue.put_nowait(
            RequestOutput(
                rid=delta.rid,
                text=text,
                token_ids=delta.token_ids,
                logprobs=delta.logprobs,
                top_logprobs=delta.top_logprobs,
                finish_reason=reason,
                matched_stop=matched,
                prompt_tokens=delta.prompt_tokens,
                completion_tokens=delta.completion_tokens,
                cached_tokens=delta.cached_tokens,
                error=delta.error,
                error_kind=delta.error_kind,
            )
        )
