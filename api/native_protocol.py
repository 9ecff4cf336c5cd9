"""SGLang's native request (the body of POST /generate, SGLang's GenerateReqInput) as msgspec types, checked, and each
prompt's `sampling_params` mapped onto the text-completion request whose conversion to SamplingParams the OpenAI
route already does (protocol.completion_sampling_params, structured.completion_grammar).

A body holds `text` (a string, or strings) or `input_ids` (ids, or lists of ids): a list is a batch, answered with a
list. `sampling_params` is one object for every prompt or one per prompt, in SGLang's names; null means the default,
as in SGLang. Fields baleen cannot honour (images, LoRA, sessions, hidden states, ...) are refused
with a 400 naming them, never ignored; unknown top-level fields are ignored, unknown sampling fields refused (SGLang
refuses those too). Nothing here looks at an engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgspec

from baleen.api.errors import ApiError
from baleen.api.protocol import (
    MAX_N,
    CompletionRequest,
    JsonSchemaFormat,
    ResponseFormat,
    decode_json,
    logit_bias_ids,
)

DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's, when sampling_params has no max_new_tokens


class NativeSamplingParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One `sampling_params` object (SGLang's SamplingParams fields)."""

    max_new_tokens: int | msgspec.UnsetType | None = msgspec.UNSET  # absent: 128; null: up to the context length
    min_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # -1 (or SGLang's 1 << 30): no limit
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    no_stop_trim: bool | None = None  # keep a matched stop string in the text (and a matched stop token's text)
    n: int | None = None
    json_schema: str | dict[str, Any] | None = None  # SGLang sends the schema as a JSON string
    regex: str | None = None
    ebnf: str | None = None
    custom_params: dict[str, Any] | None = None
    sampling_seed: int | None = None
    seed: int | None = None  # baleen's name for sampling_seed (the OpenAI routes' `seed`)
    # Accepted without effect on outputs: DeepSeek's tokenizers are fast ones, which (in SGLang too) never put
    # spaces between special tokens; baleen streams every step's tokens.
    spaces_between_special_tokens: bool | None = None
    stream_interval: int | None = None
    logit_bias: dict[str, float] | None = None  # token id (a string) -> bias in [-100, 100], as OpenAI's
    # Refused unless null or empty (_SAMPLING_REFUSED)
    stop_regex: str | list[str] | None = None
    structural_tag: str | None = None


class GenerateRequest(msgspec.Struct, kw_only=True):
    """The body of POST /generate."""

    text: str | list[str] | None = None
    input_ids: list[int | list[int]] | None = None
    sampling_params: NativeSamplingParams | list[NativeSamplingParams] | None = None
    rid: str | list[str] | None = None
    stream: bool = False
    return_logprob: bool | list[bool | None] | None = None
    logprob_start_len: int | list[int | None] | None = None  # -1: output tokens only; L: the prompt tokens from L on too
    top_logprobs_num: int | list[int | None] | None = None
    return_text_in_logprobs: bool = False
    custom_logit_processor: str | list[str | None] | None = None  # a registered processor's name, never code
    log_metrics: bool = True  # accepted: every request is counted in /metrics
    # Refused unless absent, null, false or empty (_REFUSED)
    token_ids_logprob: Any = None
    input_embeds: Any = None
    image_data: Any = None
    video_data: Any = None
    audio_data: Any = None
    lora_path: Any = None
    session_params: Any = None
    return_hidden_states: Any = False
    return_routed_experts: Any = False
    bootstrap_host: Any = None
    bootstrap_port: Any = None
    bootstrap_room: Any = None
    routed_dp_rank: Any = None
    data_parallel_rank: Any = None
    priority: Any = None


_REFUSED = {
    "input_embeds": "input embeddings are not supported: send text or input_ids",
    "image_data": "DeepSeek-V3 models read text only",
    "video_data": "DeepSeek-V3 models read text only",
    "audio_data": "DeepSeek-V3 models read text only",
    "lora_path": "LoRA adapters are not supported by this server",
    "session_params": "sessions are not supported by this server",
    "token_ids_logprob": "logprobs of chosen token ids are not computed; use top_logprobs_num",
    "return_hidden_states": "hidden states are not returned by this server",
    "return_routed_experts": "routed experts are not recorded by this server",
    "bootstrap_host": "prefill-decode disaggregation is not supported by this server",
    "bootstrap_port": "prefill-decode disaggregation is not supported by this server",
    "bootstrap_room": "prefill-decode disaggregation is not supported by this server",
    "routed_dp_rank": "this server picks each request's DP rank itself",
    "data_parallel_rank": "this server picks each request's DP rank itself",
    "priority": "request priorities are not supported by this server",
}
_SAMPLING_REFUSED = {
    "stop_regex": "stop regexes are not supported by this server; use stop strings",
    "structural_tag": "structural tags are not supported on /generate; use json_schema, regex or ebnf",
}
_decoder = msgspec.json.Decoder(GenerateRequest)


@dataclass(frozen=True)
class NativePrompt:
    """One prompt of a /generate request with what applies to it, and how error messages name its fields."""

    prompt: str | list[int]
    field: str  # "text", "input_ids[2]", ...
    sampling: NativeSamplingParams
    sampling_field: str  # "sampling_params" or "sampling_params[2]"
    return_logprob: bool
    top_logprobs_num: int
    logprob_start_len: int
    custom_logit_processor: str | None

    @property
    def max_new_tokens(self) -> int | None:
        """As asked: 0 means prefill only (SGLang's way to cache a prefix), None up to the context length."""
        value = self.sampling.max_new_tokens
        return DEFAULT_MAX_NEW_TOKENS if isinstance(value, msgspec.UnsetType) else value

    @property
    def no_stop_trim(self) -> bool:
        return bool(self.sampling.no_stop_trim)

    def field_names(self) -> dict[str, str]:
        """The engine's field names as this prompt's request spells them (for admission errors)."""
        names = {f: f"{self.sampling_field}.{f}" for f in (
            "max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
            "frequency_penalty", "presence_penalty", "logit_bias")}  # fmt: skip
        return names | {"top_logprobs": "top_logprobs_num", "prompt": self.field}

    def completion_request(self) -> CompletionRequest:
        """The same request as /v1/completions fields, for protocol.completion_sampling_params and the grammar.

        max_new_tokens 0 becomes 1: the engine always samples a token, which the route then drops.
        """
        sp, where = self.sampling, self.sampling_field
        max_new = self.max_new_tokens
        if max_new is not None and (sp.min_new_tokens or 0) > max_new >= 0:
            raise ApiError(400, f"{where}.min_new_tokens must be in [0, max_new_tokens ({max_new})], got "
                           f"{sp.min_new_tokens}", param=f"{where}.min_new_tokens")
        if sum(x is not None for x in (sp.json_schema, sp.regex, sp.ebnf)) > 1:
            raise ApiError(400, f"{where}: only one of regex, json_schema and ebnf can be set", param=where)
        logit_bias_ids(sp.logit_bias, f"{where}.logit_bias")  # its keys, named as this request spells the field
        if sp.seed is not None and sp.sampling_seed is not None and sp.seed != sp.sampling_seed:
            raise ApiError(400, f"{where} sets both sampling_seed and seed; send one", param=f"{where}.seed")
        return CompletionRequest(
            prompt="", max_tokens=1 if max_new == 0 else max_new, min_tokens=sp.min_new_tokens or 0,
            temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, min_p=sp.min_p,
            frequency_penalty=sp.frequency_penalty, presence_penalty=sp.presence_penalty,
            repetition_penalty=sp.repetition_penalty, stop=sp.stop, stop_token_ids=sp.stop_token_ids,
            seed=sp.sampling_seed if sp.sampling_seed is not None else sp.seed, ignore_eos=bool(sp.ignore_eos),
            skip_special_tokens=sp.skip_special_tokens is not False, custom_params=sp.custom_params,
            custom_logit_processor=self.custom_logit_processor, regex=sp.regex, ebnf=sp.ebnf, logit_bias=sp.logit_bias,
            response_format=_json_schema(sp.json_schema, where),
            logprobs=self.top_logprobs_num if self.return_logprob else None)


def decode_generate_request(body: bytes | str) -> GenerateRequest:
    """Decode and check a /generate body; ApiError(400) naming the bad field."""
    req = decode_json(_decoder, body)
    for name, why in _REFUSED.items():
        if _is_set(getattr(req, name)):
            raise ApiError(400, f"{name}: {why}", param=name)
    params = req.sampling_params if isinstance(req.sampling_params, list) else [req.sampling_params]
    for j, sp in enumerate(params):
        where = "sampling_params" if not isinstance(req.sampling_params, list) else f"sampling_params[{j}]"
        for name, why in _SAMPLING_REFUSED.items():
            if sp is not None and _is_set(getattr(sp, name)):
                raise ApiError(400, f"{where}.{name}: {why}", param=f"{where}.{name}")
    return req


def prompts(req: GenerateRequest) -> tuple[list[NativePrompt], int, bool]:
    """Each prompt with its settings, the choices per prompt (`n`), and whether the answer is one object (a single
    prompt and n = 1) rather than a list; ApiError(400) on a malformed batch."""
    if (req.text is None) == (req.input_ids is None):
        raise ApiError(400, "send exactly one of text and input_ids", param="text")
    kind = "text" if req.text is not None else "input_ids"
    texts, single = _prompt_list(req)
    num = len(texts)
    samplings = _each(req.sampling_params, num, "sampling_params", None)
    shown = [kind if single else f"{kind}[{j}]" for j in range(num)]
    where = ([f"sampling_params[{j}]" for j in range(num)] if isinstance(req.sampling_params, list)
             else ["sampling_params"] * num)  # fmt: skip
    ns = {sp.n if sp is not None and sp.n is not None else 1 for sp in samplings}
    if len(ns) > 1:
        raise ApiError(400, "sampling_params.n must be the same for every prompt", param="sampling_params")
    n = ns.pop()
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"{where[0]}.n must be in [1, {MAX_N}], got {n}", param=f"{where[0]}.n")
    logprob = _each(req.return_logprob, num, "return_logprob", False)
    top = _each(req.top_logprobs_num, num, "top_logprobs_num", 0)
    start = _each(req.logprob_start_len, num, "logprob_start_len", -1)
    processor = _each(req.custom_logit_processor, num, "custom_logit_processor", None)
    _each(req.rid, num, "rid", None)  # a list needs one id per prompt
    out = [NativePrompt(texts[j], shown[j], samplings[j] or NativeSamplingParams(), where[j], bool(logprob[j]),
                        top[j], start[j], processor[j]) for j in range(num)]
    return out, n, single and n == 1


def choice_ids(req: GenerateRequest, num_prompts: int, n: int, single: bool) -> list[str | None]:
    """meta_info.id of each choice (prompt-major), as SGLang derives them from `rid`; None: the engine's own id."""
    rid = req.rid
    if rid is None:
        return [None] * (num_prompts * n)
    if isinstance(rid, str):
        return [rid] if single else [f"{rid}_{i}" for i in range(num_prompts * n)]
    return [r if n == 1 else f"{r}_{k}" for r in rid for k in range(n)]


def _prompt_list(req: GenerateRequest) -> tuple[list[str | list[int]], bool]:
    if req.text is not None:
        if isinstance(req.text, str):
            return [req.text], True
        if not req.text:
            raise ApiError(400, "text is an empty list", param="text")
        return list(req.text), False
    ids = req.input_ids or []
    if not ids:
        raise ApiError(400, "input_ids cannot be empty", param="input_ids")
    flat = [x for x in ids if isinstance(x, int)]
    if len(flat) == len(ids):
        return [flat], True
    if flat:
        raise ApiError(400, "input_ids mixes token ids with lists; send ids or lists of ids", param="input_ids")
    lists = [x for x in ids if isinstance(x, list)]
    for j, one in enumerate(lists):
        if not one:
            raise ApiError(400, f"input_ids[{j}] is empty", param=f"input_ids[{j}]")
    return list(lists), False


def _each(value: Any, num: int, name: str, default: Any) -> list[Any]:
    """A field given once or once per prompt, as one value per prompt."""
    if value is None:
        return [default] * num
    if isinstance(value, list):
        if len(value) != num:
            raise ApiError(400, f"{name} has {len(value)} entries for {num} prompts", param=name)
        return [default if v is None else v for v in value]
    return [value] * num


def _json_schema(value: str | dict[str, Any] | None, where: str) -> ResponseFormat | None:
    if value is None:
        return None
    schema: Any = value
    if isinstance(value, str):
        try:
            schema = json.loads(value)
        except ValueError as e:
            raise ApiError(400, f"{where}.json_schema is not valid JSON: {e}", param=f"{where}.json_schema") from None
    if not isinstance(schema, dict):
        raise ApiError(400, f"{where}.json_schema must be a JSON schema object", param=f"{where}.json_schema")
    return ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(schema=schema))


def _is_set(value: Any) -> bool:
    """Whether a refused field asks for something: not absent, null, false, empty, or a list of those."""
    if isinstance(value, list | dict):
        return any(_is_set(v) for v in (value.values() if isinstance(value, dict) else value))
    return not (value is None or value is False or value == "")
