"""Tool-call parsers for DeepSeek output: `--tool-call-parser deepseekv3 | deepseekv31`.

The text still holds the special tokens (the server keeps them when tools are in play):

    deepseekv3:  <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>
                 (calls separated by a newline) <｜tool▁calls▁end｜>
    deepseekv31: <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>

Text before the calls is content. Arguments are passed on exactly as generated (a JSON string when the model
wrote valid JSON, the raw text otherwise). Streaming sends a call's id and name once, then its arguments as
they arrive, holding back only what could still turn out to be the closing fence or a special token; the
final result is the same as `parse` on the whole text for any chunking.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from baleen.api.reasoning import partial_tail
from baleen.model.tokenizer_build import EOS_TOKEN as EOS
from baleen.model.tokenizer_build import TOOL_CALL_BEGIN as CALL_BEGIN
from baleen.model.tokenizer_build import TOOL_CALL_END as CALL_END
from baleen.model.tokenizer_build import TOOL_CALLS_BEGIN as CALLS_BEGIN
from baleen.model.tokenizer_build import TOOL_CALLS_END as CALLS_END
from baleen.model.tokenizer_build import TOOL_SEP as SEP

TOOL_CALL_PARSERS = ("deepseekv3", "deepseekv31")

_TEXT_MARKERS = (CALLS_BEGIN, CALL_BEGIN, EOS)
_ARGS_ENDS = (CALL_END, CALLS_END)
_FENCE = re.compile(r"```[A-Za-z]*")


def random_call_id(index: int) -> str:
    """An OpenAI-style call id, "call_" and 24 random hex digits."""
    return f"call_{secrets.token_hex(12)}"


@dataclass
class ToolCall:
    """A parsed call: id, function name, and arguments as the model wrote them."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        """The entry of a message's `tool_calls`."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolCallDelta:
    """A streamed piece of call `index`: its id and name come once, first; then argument fragments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        """The entry of a chunk's `delta.tool_calls`."""
        out: dict[str, Any] = {"index": self.index}
        function: dict[str, Any] = {"arguments": self.arguments}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        if self.name is not None:
            function["name"] = self.name
        out["function"] = function
        return out


Delta = str | ToolCallDelta  # content text, or a piece of a tool call


def _held_before(text: str, markers: tuple[str, ...]) -> int:
    """Length of `text`'s end to hold back: whitespace, then a partial marker."""
    j = len(text) - max(partial_tail(text, m) for m in markers)
    while j > 0 and text[j - 1].isspace():
        j -= 1
    return len(text) - j


def _held_args(text: str) -> int:
    """Length of the arguments' end to hold back: what could still be `ws* [```] ws*` + the end token."""
    j = len(text) - max(partial_tail(text, m) for m in _ARGS_ENDS)
    while j > 0 and text[j - 1].isspace():
        j -= 1
    ticks = 0
    while j > 0 and ticks < 3 and text[j - 1] == "`":
        j, ticks = j - 1, ticks + 1
    while j > 0 and text[j - 1].isspace():
        j -= 1
    return len(text) - j


def _strip_closing_fence(text: str, *, cut: bool = False) -> str:
    """Drop the fence that closes the arguments; with `cut` (output truncated) also a partial one."""
    text = text.rstrip()
    ticks = len(text) - len(text.rstrip("`"))
    if ticks >= 3 or (cut and ticks):
        text = text[: len(text) - min(ticks, 3)].rstrip()
    return text


class ToolCallParser:
    """One request's tool-call parser (`deepseekv3` format; DeepSeekV31ToolParser overrides the header)."""

    name = "deepseekv3"

    def __init__(self, *, make_id: Callable[[int], str] = random_call_id, tools: Collection[str] | None = None) -> None:
        self._make_id = make_id
        # the request's tool names: a call to any other is skipped, its text with it (as SGLang does); None: any name
        self._tools = None if tools is None else frozenset(tools)
        self._buf = ""
        self._state = "text"
        self._strip_lead = False  # drop whitespace that starts a section (after the calls, before arguments)
        self._fence_done = False
        self._out: list[Delta] = []
        self.tool_calls: list[ToolCall] = []  # every call so far, arguments accumulated
        # set by finish(): the output ended inside a call, e.g. a stop token or string cut it off.
        # Its arguments are what was generated (streamed already); the turn did not end in calls to make.
        self.cut_off = False

    # -- public ----------------------------------------------------------------------------------------

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a whole output; content None when there is none. Call it on a fresh parser (it
        feeds and finishes this one, so `made_calls` tells about that output)."""
        deltas = self.feed(text) + self.finish()
        content = "".join(d for d in deltas if isinstance(d, str))
        return content or None, self.tool_calls

    @property
    def made_calls(self) -> bool:
        """After finish() or parse(): the output ended in calls to make, at least one and none cut off."""
        return bool(self.tool_calls) and not self.cut_off

    def feed(self, delta: str) -> list[Delta]:
        """The content text and tool-call pieces a new piece of output completes (in order)."""
        self._buf += delta
        return self._run(final=False)

    def finish(self) -> list[Delta]:
        """Flush at the end of the output; a call cut off mid-arguments keeps what was generated (`cut_off`)."""
        self.cut_off = self._state in ("header", "args_open", "args", "skip")
        return self._run(final=True)

    # -- states ----------------------------------------------------------------------------------------

    def _run(self, *, final: bool) -> list[Delta]:
        self._out = []
        step = {"text": self._text, "calls": self._calls, "header": self._header, "args_open": self._args_open,
                "args": self._args, "skip": self._skip}
        while step[self._state](final):
            pass
        out: list[Delta] = []
        for d in self._out:  # merge neighbours: text with text, pieces of one call with each other
            if out and isinstance(d, str) and isinstance(out[-1], str):
                out[-1] += d
            elif out and isinstance(d, ToolCallDelta) and isinstance(out[-1], ToolCallDelta) \
                    and out[-1].index == d.index and d.id is None:
                out[-1].arguments += d.arguments
            elif not (isinstance(d, str) and not d):
                out.append(d)
        return out

    def _text(self, final: bool) -> bool:
        buf = self._buf
        if self._strip_lead:
            buf = buf.lstrip()
            if not buf and not final:
                self._buf = ""
                return False
            self._strip_lead = False
        hits = [(i, m) for m in _TEXT_MARKERS if (i := buf.find(m)) >= 0]
        if hits:
            i, marker = min(hits)
            if marker == EOS:  # the end-of-sentence token is not content
                self._out.append(buf[:i])
                self._buf = buf[i + len(marker):]
                return True
            self._out.append(buf[:i].rstrip())
            self._buf = buf[i + len(marker):]
            self._state = "calls" if marker == CALLS_BEGIN else "header"  # a lone call_begin opens a call too
            return True
        keep = 0 if final else _held_before(buf, _TEXT_MARKERS)
        self._out.append(buf[: len(buf) - keep])
        self._buf = buf[len(buf) - keep:]
        return False

    def _calls(self, final: bool) -> bool:
        s = self._buf.lstrip()
        for marker, state in ((CALL_BEGIN, "header"), (CALLS_END, "text"), (EOS, "text")):
            if s.startswith(marker):
                self._buf, self._state, self._strip_lead = s[len(marker):], state, state == "text"
                return True
        if not final and any(m.startswith(s) for m in (CALL_BEGIN, CALLS_END, EOS)):
            self._buf = s
            return False
        self._buf, self._state = s, "text"  # something else between calls: treat it as content
        return True

    def _header(self, final: bool) -> bool:
        buf = self._buf
        ends = [(i, m) for m in _ARGS_ENDS if (i := buf.find(m)) >= 0]
        parsed = self._split_header(buf, final)
        if parsed is not None and (not ends or len(buf) - len(parsed[1]) <= min(ends)[0]):
            name, rest = parsed
            if self._tools is not None and name not in self._tools:  # not a tool of this request: skip the call
                self._buf, self._state = rest, "skip"
                return True
            index = len(self.tool_calls)
            call = ToolCall(id=self._make_id(index), name=name, arguments="")
            self.tool_calls.append(call)
            self._out.append(ToolCallDelta(index=index, id=call.id, name=name))
            self._buf, self._state, self._fence_done = rest, "args_open", False
            return True
        if ends:  # an end token before the header is complete: a malformed call, skipped
            i, marker = min(ends)
            self._buf = buf[i + len(marker):]
            self._state, self._strip_lead = ("calls", False) if marker == CALL_END else ("text", True)
            return True
        if final:  # cut off before the name was complete: nothing to report
            self._buf = ""
        return False

    def _split_header(self, buf: str, final: bool) -> tuple[str, str] | None:
        """(name, text after the header) once the header is complete; None while it is not (or is empty).

        deepseekv3: TYPE<｜tool▁sep｜>NAME then a newline (or directly the end token of an argument-less call).
        """
        sep = buf.find(SEP)
        if sep < 0:
            return None
        after = buf[sep + len(SEP):]
        stops = [i for i in (after.find("\n"), *(after.find(m) for m in _ARGS_ENDS)) if i >= 0]
        if stops:
            stop = min(stops)
            rest = after[stop + 1:] if after[stop] == "\n" else after[stop:]
        elif final:
            stop, rest = len(after), ""  # cut off right after the name: keep the name
        else:
            return None
        name = after[:stop].strip()
        return (name, rest) if name else None

    def _args_open(self, final: bool) -> bool:
        s = self._buf.lstrip()
        if not self._fence_done and s.startswith("```"):
            m = _FENCE.match(s)
            assert m is not None
            if m.end() == len(s) and not final:  # "```js" may still grow into "```json"
                self._buf = s
                return False
            self._buf, self._fence_done = s[m.end():], True
            return True
        if not final and (not s or (not self._fence_done and "```".startswith(s))):
            self._buf = s
            return False
        self._buf, self._state = s, "args"
        return True

    def _args(self, final: bool) -> bool:
        buf = self._buf
        ends = [(i, m) for m in _ARGS_ENDS if (i := buf.find(m)) >= 0]
        if ends:
            i, marker = min(ends)
            self._emit_args(_strip_closing_fence(buf[:i]), closing=True)
            self._buf = buf[i + len(marker):]
            self._state, self._strip_lead = ("calls", False) if marker == CALL_END else ("text", True)
            return True
        if final:
            self._emit_args(_strip_closing_fence(buf, cut=True), closing=False)
            self._buf = ""
            return False
        keep = _held_args(buf)
        self._emit_args(buf[: len(buf) - keep], closing=False)
        self._buf = buf[len(buf) - keep:]
        return False

    def _skip(self, final: bool) -> bool:
        """Inside a call to a name the request has no tool for: drop its text up to the call's end."""
        buf = self._buf
        ends = [(i, m) for m in _ARGS_ENDS if (i := buf.find(m)) >= 0]
        if ends:
            i, marker = min(ends)
            self._buf = buf[i + len(marker):]
            self._state, self._strip_lead = ("calls", False) if marker == CALL_END else ("text", True)
            return True
        keep = 0 if final else _held_before(buf, _ARGS_ENDS)  # the start of an end token may be arriving
        self._buf = buf[len(buf) - keep:]
        return False

    def _emit_args(self, text: str, *, closing: bool) -> None:
        call = self.tool_calls[-1]
        if closing and not call.arguments and not text:
            text = "{}"  # a complete call with no arguments
        if text:
            call.arguments += text
            self._out.append(ToolCallDelta(index=len(self.tool_calls) - 1, arguments=text))


class DeepSeekV31ToolParser(ToolCallParser):
    """`deepseekv31`: NAME<｜tool▁sep｜>ARGS, no type word, no code fence."""

    name = "deepseekv31"

    def _split_header(self, buf: str, final: bool) -> tuple[str, str] | None:
        sep = buf.find(SEP)
        if sep < 0:
            if not final:
                return None
            sep = len(buf)
        name = buf[:sep].strip()
        return (name, buf[sep + len(SEP):]) if name else None


def make_tool_parser(name: str, *, make_id: Callable[[int], str] = random_call_id,
                     tools: Collection[str] | None = None) -> ToolCallParser:  # fmt: skip
    """The parser `--tool-call-parser NAME` asks for, fresh for one request (`tools`: its tools' names, see
    ToolCallParser)."""
    if name == "deepseekv3":
        return ToolCallParser(make_id=make_id, tools=tools)
    if name == "deepseekv31":
        return DeepSeekV31ToolParser(make_id=make_id, tools=tools)
    raise ValueError(f"unknown tool-call parser {name!r}; choose one of {list(TOOL_CALL_PARSERS)}")
