"""The frontend's request state and incremental detokenization: token ids in, UTF-8-safe text out, stop strings
caught across tokens."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from baleen.actors.actor import Actor
from baleen.actors.channel import Channel
from baleen.messages import (
    AbortRequest,
    CacheFlushed,
    Message,
    MetricsReport,
    RequestOutput,
    SamplingParams,
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
class _Request:
    """One request the frontend waits on: its decoder and the queue its `generate` call reads."""

    decoder: RequestDecoder
    outputs: asyncio.Queue[RequestOutput]
    finished: bool = False  # its last output was handed out: later ones (rows in flight) are dropped
    trim_stop_token: bool = True  # a matched stop token's text is not part of the text (SamplingParams.no_stop_trim)


@dataclass
class _Sends:
    """What one batch of messages produced: outputs for the waiting streams, stop-string aborts for the scheduler."""

    outputs: list[tuple[asyncio.Queue[RequestOutput], RequestOutput]] = field(default_factory=list)
    aborts: list[AbortRequest] = field(default_factory=list)


class DetokenizerActor(Actor[_Sends, None]):
    """The frontend's request state: every live request, its decoder and its output queue.

    `Engine` registers a request before submitting it and closes it when its stream ends; this actor turns the
    scheduler's outputs into text and hands each to its request's queue. The decoder, the queue and `finished`
    change only here.

    NOTE: a stop string is matched here, on text, after the scheduler sent the tokens: this actor then sends
    the scheduler an AbortRequest(reason "stop") to free the request. It is the one message going back
    upstream; the request's later tokens, already planned, are dropped here.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        inbox: Channel,
        scheduler: Channel,
        on_metrics: Callable[[dict[str, float]], None],
        on_flushed: Callable[[CacheFlushed], None] | None = None,
    ) -> None:
        super().__init__(inbox, name="detokenizer")
        self.tokenizer = tokenizer
        self.scheduler = scheduler  # where stop-string matches are sent as aborts
        self.on_metrics = on_metrics
        self.on_flushed = on_flushed  # the scheduler's answers to FlushCache
        self.last_output_at = 0.0  # time.monotonic() of the latest requests' outputs (the engine's progress)
        self._requests: dict[str, _Request] = {}

    # ---- the frontend's side: register, close, end ------------------------------------------------------

    def register(self, rid: str, sampling: SamplingParams) -> asyncio.Queue[RequestOutput]:
        """Track a request before it is submitted; the queue its outputs arrive on. ValueError if `rid` is live."""
        if rid in self._requests:
            raise ValueError(f"request id {rid!r} is already in use")
        decoder = RequestDecoder(self.tokenizer, skip_special_tokens=sampling.skip_special_tokens, stop=sampling.stop)
        request = _Request(decoder, asyncio.Queue(), trim_stop_token=not sampling.no_stop_trim)
        self._requests[rid] = request
        return request.outputs

    def close(self, rid: str) -> bool:
        """Forget a request whose stream ended; True if it had not finished (the scheduler must abort it)."""
        request = self._requests.pop(rid, None)
        return request is not None and not request.finished

    def end_all(self, reason: str, error: str | None = None, error_kind: str | None = None) -> None:
        """Give every unfinished request its last output now (the engine closes, or died)."""
        for rid, request in self._requests.items():
            if not request.finished:
                request.finished = True
                request.outputs.put_nowait(RequestOutput(rid=rid, finish_reason=reason, error=error,
                                                         error_kind=error_kind))

    def __contains__(self, rid: str) -> bool:
        return rid in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    @property
    def rids(self) -> list[str]:
        """The live requests' ids."""
        return list(self._requests)

    # ---- the loop ---------------------------------------------------------------------------------------

    def decide(self, messages: list[Message]) -> _Sends | None:
        sends = _Sends()
        for msg in messages:
            match msg:
                case TokenDeltas():
                    if msg.items:
                        self.last_output_at = time.monotonic()
                    for out in msg.items:
                        self._decode(out, sends)
                case MetricsReport():
                    self.on_metrics(msg.values)
                case CacheFlushed() if self.on_flushed is not None:
                    self.on_flushed(msg)
                case WorkerReady():
                    pass
                case _:
                    raise TypeError(f"detokenizer got an unexpected {type(msg).__name__}")
        return sends if sends.outputs or sends.aborts else None

    async def launch(self, plan: _Sends) -> None:
        for queue, out in plan.outputs:
            queue.put_nowait(out)
        for abort in plan.aborts:
            await self.scheduler.send(abort)
        return None

    def _decode(self, out: RequestOutput, sends: _Sends) -> None:
        """Add `out`'s text (it is the scheduler's object, handed on as it is); catch a stop string."""
        request = self._requests.get(out.rid)
        if request is None or request.finished:
            return  # its stream is gone, or a stop string already ended it
        ids = out.token_ids
        if ids and request.trim_stop_token and out.finish_reason == "stop" and isinstance(out.matched_stop, int):
            ids = ids[:-1]  # the stop token (EOS, a stop_token_ids entry) ends the text without its own text, as SGLang
        d = request.decoder.feed(ids)
        out.text = d.text
        if d.matched_stop is not None:
            if out.finish_reason is None:
                sends.aborts.append(AbortRequest(out.rid, "stop", d.matched_stop))
            out.finish_reason, out.matched_stop = "stop", d.matched_stop
        elif out.finished:
            out.text += request.decoder.finish()
        request.finished = out.finished
        sends.outputs.append((request.outputs, out))
