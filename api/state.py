"""What every route reads: the server's config, the surface of the engine it serves, and `ServerState`.

The server (server.py) builds one ServerState and hands it to each route (serving_chat.py,
serving_completion.py); the routes and the server import this module, never each other.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tokenizers import Tokenizer

from baleen.actors.admission import AdmissionError, Limits, check_request
from baleen.api.chat_template import ChatTemplate
from baleen.api.errors import ApiError, admission_error
from baleen.api.metrics import FrontendMetrics
from baleen.api.reasoning import REASONING_PARSERS
from baleen.api.tool_parser import TOOL_CALL_PARSERS
from baleen.messages import CacheFlushed, RequestOutput, SamplingParams
from baleen.model.logit_processors import LogitProcessorRegistry


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
    # A `: ping` SSE comment after this many seconds without data on an OpenAI-route stream (0: never, as SGLang
    # and vLLM: their benchmark clients parse every non-empty line as JSON and fail a request on a comment).
    sse_ping_interval_s: float = 0.0
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
        if self.sse_ping_interval_s < 0:
            raise ValueError(f"--sse-ping-interval must be >= 0 seconds, got {self.sse_ping_interval_s}")
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
    limits: Limits  # what a request is checked against before it is submitted
    metrics: dict[str, float]
    error: str | None

    @property
    def healthy(self) -> bool: ...

    @property
    def num_requests(self) -> int: ...

    @property
    def last_output_at(self) -> float: ...

    def generate(self, prompt: str | Sequence[int], sampling: SamplingParams | None = None, *,
                 rid: str | None = None) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, rid: str) -> None: ...

    async def abort_all(self) -> None: ...

    async def flush_cache(self, timeout: float = ...) -> CacheFlushed: ...

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
        self.draining = False  # set at shutdown: /health answers 503

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

    def admit(self, prompt_ids: Sequence[int], params: SamplingParams, names: Mapping[str, str]) -> None:
        """ApiError(400) naming the request's field (`names`: how it spells the engine's) unless the engine can
        take this request: the engine's own admission check, then its custom logit processor."""
        try:
            check_request(prompt_ids, params, self.engine.limits, names=names)
        except AdmissionError as e:
            raise admission_error(e) from None
        self._check_processor(params)

    def _check_processor(self, params: SamplingParams) -> None:
        """A named logit processor must be registered and accept its custom_params (checked, not built: only
        the worker builds processors)."""
        name = params.custom_logit_processor
        if name is None:
            return
        if self.processors is None:
            raise ApiError(400, "custom logit processors are disabled on this server (start it with "
                           "--enable-custom-logit-processor)", param="custom_logit_processor")
        if name not in self.processors.names():
            raise ApiError(400, f"unknown custom_logit_processor {name!r}; this server has {self.processors.names()}",
                           param="custom_logit_processor")
        try:
            self.processors.check(name, params.custom_params, self.tokenizer)
        except ValueError as e:
            raise ApiError(400, str(e), param="custom_params") from None
