"""OpenAI request types (msgspec) and their conversion to SamplingParams (the response bodies are in bodies.py).

`decode_chat_request(body)` / `decode_completion_request(body)` ignore unknown fields as OpenAI does and
turn a bad field into an ApiError(400) whose `param` is its path ("messages[0].role"). Nothing here looks at
an engine.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal, TypeVar

import msgspec

from baleen.actors.admission import AdmissionError, check_sampling
from baleen.api.errors import ApiError, admission_error
from baleen.messages import SamplingParams

# ---- request types ----------------------------------------------------------------------------------


class ContentPart(msgspec.Struct, kw_only=True):
    """One part of a message's content list; only "text" parts are accepted (checked after decoding)."""

    type: str
    text: str | None = None


class FunctionCall(msgspec.Struct, kw_only=True):
    """A function call an assistant made: its name and arguments (a JSON string, or an object)."""

    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(msgspec.Struct, kw_only=True):
    """A tool call in an assistant message of the conversation history."""

    function: FunctionCall
    id: str | None = None
    type: str = "function"


class ChatMessage(msgspec.Struct, kw_only=True):
    """One conversation turn."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # sent back by some clients; templates drop past reasoning


class FunctionDef(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A function the model may call (unset fields are left out when it is shown to the template)."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(msgspec.Struct, kw_only=True):
    """An entry of `tools` (fields in OpenAI's order: the template prints it as JSON)."""

    type: Literal["function"] = "function"
    function: FunctionDef


class ToolChoiceFunction(msgspec.Struct, kw_only=True):
    name: str


class NamedToolChoice(msgspec.Struct, kw_only=True):
    """`{"type": "function", "function": {"name": ...}}`: the model must call this function."""

    type: Literal["function"] = "function"
    function: ToolChoiceFunction


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class JsonSchemaFormat(msgspec.Struct, kw_only=True):
    """`response_format.json_schema`: the schema the answer must validate against (`strict` or not, it is
    enforced)."""

    name: str = "response"
    schema: dict[str, Any] | None = None  # None: any JSON object
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(msgspec.Struct, kw_only=True):
    """`{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _RequestParams(msgspec.Struct, kw_only=True):
    """Fields chat and text completions share (sampling, stopping, streaming, extensions)."""

    model: str = "default"
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False
    custom_logit_processor: str | None = None
    custom_params: dict[str, Any] | None = None
    logit_bias: dict[str, float] | None = None  # OpenAI's: token id (as a string) -> bias in [-100, 100]
    user: str | None = None
    # Structured output (api/structured.py): at most one of these.
    response_format: ResponseFormat | None = None
    regex: str | None = None  # SGLang's: the output fullmatches this regular expression
    ebnf: str | None = None  # SGLang's: the output is a sentence of this grammar (xgrammar's EBNF, rule `root`)

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return self.stream and self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_RequestParams, kw_only=True):
    """The body of POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    separate_reasoning: bool = True
    # OpenAI fields this server cannot honour: refused when set (_REFUSED_CHAT), never silently dropped
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: list[str] | None = None

    def template_messages(self) -> list[dict[str, Any]]:
        """The messages as chat templates read them: plain dicts, text content, string arguments."""
        return [_template_message(m) for m in self.messages]

    def template_tools(self) -> list[dict[str, Any]] | None:
        """Tools to describe in the prompt: none for tool_choice "none", only the named one when one is forced."""
        if not self.tools or self.tool_choice == "none":
            return None
        tools = self.tools
        if isinstance(self.tool_choice, NamedToolChoice):
            tools = [t for t in tools if t.function.name == self.tool_choice.function.name]
        return [msgspec.to_builtins(t) for t in tools]

    @property
    def parses_tool_calls(self) -> bool:
        """Whether the output may hold tool calls for the tool-call parser to extract."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def thinking(self) -> bool:
        """Whether chat_template_kwargs turn thinking on (V3.1's `thinking`, also spelled `enable_thinking`)."""
        kwargs = self.chat_template_kwargs or {}
        return bool(kwargs.get("thinking", kwargs.get("enable_thinking", False)))


class CompletionRequest(_RequestParams, kw_only=True):
    """The body of POST /v1/completions."""

    prompt: str | list[str | int | list[int]]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None  # how many top alternatives per token; 0 = only the sampled token's
    best_of: int | None = None  # refused above n (_check_completion): each choice is one sample

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of texts or token-id lists (one completion set per entry)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        ints = [x for x in p if isinstance(x, int)]
        if len(ints) == len(p):
            return [ints]
        if ints:
            raise ApiError(400, "prompt mixes token ids with strings or lists; send one kind", param="prompt")
        return [x for x in p if not isinstance(x, int)]


# ---- decoding and validation -----------------------------------------------------------------------

_chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
_completion_decoder = msgspec.json.Decoder(CompletionRequest)
_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `([^`]+)`")
_RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "add_generation_prompt")
MAX_N = 128
T = TypeVar("T")


def decode_chat_request(body: bytes | str) -> ChatCompletionRequest:
    """Decode and validate a chat completion body; ApiError(400) naming the bad field."""
    req = decode_json(_chat_decoder, body)
    _check_chat(req)
    return req


def decode_completion_request(body: bytes | str) -> CompletionRequest:
    """Decode and validate a text completion body; ApiError(400) naming the bad field."""
    req = decode_json(_completion_decoder, body)
    _check_completion(req)
    return req


def decode_json(decoder: msgspec.json.Decoder[T], body: bytes | str) -> T:
    """Decode a body; msgspec's "Expected `int`, got `str` - at `$.n`" becomes an ApiError whose param is the path."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as e:
        text = str(e)
        m, missing = _PATH.search(text), _MISSING.match(text)
        path = m.group(1) if m else ""
        if missing:
            path = f"{path}.{missing.group(1)}" if path else missing.group(1)
        raise ApiError(400, f"invalid request: {text}", param=path or None) from None
    except msgspec.DecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None


def _check_common(req: _RequestParams) -> None:
    if not 1 <= req.n <= MAX_N:
        raise ApiError(400, f"n must be in [1, {MAX_N}], got {req.n}", param="n")
    if req.stop_token_ids is not None and any(t < 0 for t in req.stop_token_ids):
        raise ApiError(400, "stop_token_ids must be non-negative token ids", param="stop_token_ids")


def _check_chat(req: ChatCompletionRequest) -> None:
    _check_common(req)
    if not req.messages:
        raise ApiError(400, "messages must hold at least one message", param="messages")
    for i, msg in enumerate(req.messages):
        if isinstance(msg.content, list):
            for j, part in enumerate(msg.content):
                if part.type != "text" or part.text is None:
                    raise ApiError(400, f"content part type {part.type!r} is not supported: this model reads "
                                   "text only (send {\"type\": \"text\", \"text\": ...})",
                                   param=f"messages[{i}].content[{j}].type")
        if msg.tool_calls and msg.role != "assistant":
            raise ApiError(400, f"only assistant messages may carry tool_calls, not {msg.role!r}",
                           param=f"messages[{i}].tool_calls")
    for name, why in _REFUSED_CHAT.items():
        if getattr(req, name) not in (None, [], {}):
            raise ApiError(400, f"{name}: {why}", param=name)
    if req.modalities is not None and set(req.modalities) - {"text"}:
        raise ApiError(400, f"modalities {req.modalities}: this model writes text only", param="modalities")
    for key in set(req.chat_template_kwargs or {}) & set(_RESERVED_TEMPLATE_KWARGS):
        raise ApiError(400, f"chat_template_kwargs may not set {key!r}; send it as a request field",
                       param="chat_template_kwargs")
    check_tool_choice(req)


_REFUSED_CHAT = {
    "functions": "OpenAI's deprecated function-calling field is not supported; send tools (and tool_choice)",
    "function_call": "OpenAI's deprecated function-calling field is not supported; send tool_choice with tools",
    "audio": "this model writes text only",
}


def check_tool_choice(req: ChatCompletionRequest) -> None:
    """tool_choice must name a tool in `tools`, and "required" needs tools; ApiError(400) otherwise."""
    names = [t.function.name for t in req.tools or []]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ApiError(400, f"tools holds the function name(s) {dup} more than once", param="tools")
    choice = req.tool_choice
    if choice == "required" and not names:
        raise ApiError(400, 'tool_choice "required" needs at least one tool in tools', param="tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise ApiError(400, f"tool_choice names function {choice.function.name!r}, which is not in tools "
                       f"({names})", param="tool_choice")


def _check_completion(req: CompletionRequest) -> None:
    _check_common(req)
    if req.suffix:
        raise ApiError(400, "suffix is not supported: DeepSeek-V3 models have no fill-in-the-middle prompt "
                       "format here; put all text in prompt", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise ApiError(400, f"best_of {req.best_of} is not supported (each choice is one sample, none is picked "
                       "among others); send n alone", param="best_of")
    prompts = req.prompts()  # never empty: [] reads as one empty token-id prompt, refused below
    for i, p in enumerate(prompts):
        if isinstance(p, list) and (not p or any(t < 0 for t in p)):
            raise ApiError(400, "a token-id prompt must be a non-empty list of non-negative ids",
                           param="prompt" if len(prompts) == 1 else f"prompt[{i}]")


def _template_message(m: ChatMessage) -> dict[str, Any]:
    content = m.content
    if isinstance(content, list):
        content = "\n".join(p.text or "" for p in content)
    # DeepSeek templates know no "developer" role; OpenAI defines it as the newer name for "system".
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
    if m.role != "assistant" and content is None:
        out["content"] = ""
    if m.name is not None:
        out["name"] = m.name
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": c.type, "function": {"name": c.function.name, "arguments": (
            a if isinstance(a := c.function.arguments, str) else json.dumps(a, ensure_ascii=False))}}
            for c in m.tool_calls]
    return out


# ---- conversion to SamplingParams ------------------------------------------------------------------

# SGLang clients send `SomeProcessor().to_str()`: JSON holding a pickled object. Pickles are never loaded
# here; a known class name inside one only selects the built-in that does the same job.
_PROCESSOR_ALIASES = {"DeepSeekR1ThinkingBudgetLogitProcessor": "deepseek_r1_thinking_budget"}


def resolve_logit_processor(value: str | None) -> str | None:
    """The registry name a request's `custom_logit_processor` asks for (serialized code is refused)."""
    if value is None or not value.lstrip().startswith("{"):
        return _PROCESSOR_ALIASES.get(value, value) if value is not None else None
    try:
        blob = bytes.fromhex(json.loads(value)["callable"])
    except (ValueError, KeyError, TypeError):
        blob = b""
    for cls_name, name in _PROCESSOR_ALIASES.items():
        if cls_name.encode() in blob:
            return name
    raise ApiError(400, "custom_logit_processor holds serialized code, which this server never runs; pass "
                   f"the name of a registered processor (built-in: {sorted(set(_PROCESSOR_ALIASES.values()))})",
                   param="custom_logit_processor")


def _stop_list(stop: str | list[str] | None) -> list[str]:
    return [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]


# How each request spells the engine's fields, so an admission error names the field the client sent.
COMPLETION_FIELDS = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "top_logprobs": "logprobs"}


def chat_fields(req: ChatCompletionRequest) -> dict[str, str]:
    """The engine's field names as this chat request spells them (its prompt is `messages`)."""
    max_field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    return {"max_new_tokens": max_field, "min_new_tokens": "min_tokens", "prompt": "messages"}


def _checked(params: SamplingParams, names: dict[str, str]) -> SamplingParams:
    """The sampling half of the engine's admission check, naming the request field the client actually sent."""
    try:
        check_sampling(params, names)
    except AdmissionError as e:
        raise admission_error(e) from None
    return params


def chat_sampling_params(req: ChatCompletionRequest, *, default_max_tokens: int | None = None) -> SamplingParams:
    """SamplingParams for a chat request; ApiError(400) naming the field that is out of range.

    When the output will be searched for tool calls, special tokens are kept in the text: the tool-call
    markers are special tokens.
    """
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    top_logprobs = req.top_logprobs or 0
    params = SamplingParams(**_common_fields(req), max_new_tokens=default_max_tokens if max_tokens is None else max_tokens,
                            logprobs=req.logprobs or top_logprobs > 0, top_logprobs=top_logprobs,
                            skip_special_tokens=req.skip_special_tokens and not req.parses_tool_calls)
    return _checked(params, chat_fields(req))


def completion_sampling_params(req: CompletionRequest, *, default_max_tokens: int | None = 16,
                               names: dict[str, str] = COMPLETION_FIELDS) -> SamplingParams:
    """SamplingParams for a text completion (OpenAI's default max_tokens is 16); ApiError(400) on bad fields.

    names: how the request spells the engine's fields in error messages (SGLang's /generate maps its own fields here).
    """
    params = SamplingParams(**_common_fields(req), logprobs=req.logprobs is not None, top_logprobs=req.logprobs or 0,
                            max_new_tokens=default_max_tokens if req.max_tokens is None else req.max_tokens,
                            skip_special_tokens=req.skip_special_tokens,
                            logprob_start_len=0 if req.echo and req.logprobs is not None else -1)
    return _checked(params, names)


def _common_fields(req: _RequestParams) -> dict[str, Any]:
    def either(value: float | None, default: float) -> float:
        return default if value is None else value

    return {
        "min_new_tokens": req.min_tokens, "temperature": either(req.temperature, 1.0),
        "top_p": either(req.top_p, 1.0), "min_p": either(req.min_p, 0.0),
        "top_k": None if req.top_k in (None, 0, -1) else req.top_k,  # 0 and -1 both mean "no limit"
        "repetition_penalty": either(req.repetition_penalty, 1.0),
        "frequency_penalty": either(req.frequency_penalty, 0.0),
        "presence_penalty": either(req.presence_penalty, 0.0),
        "seed": req.seed, "stop": _stop_list(req.stop), "stop_token_ids": list(req.stop_token_ids or []),
        "ignore_eos": req.ignore_eos, "custom_params": req.custom_params,
        "custom_logit_processor": resolve_logit_processor(req.custom_logit_processor),
        "logit_bias": logit_bias_ids(req.logit_bias),
    }


def logit_bias_ids(bias: dict[str, float] | None, field: str = "logit_bias") -> dict[int, float] | None:
    """OpenAI's logit_bias (token ids as JSON object keys) with int keys; ApiError(400) for a key that is not one."""
    if not bias:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise ApiError(400, f"{field} keys are token ids, got {key!r}", param=field) from None
        out[token] = value
    return out
