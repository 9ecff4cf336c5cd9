"""The server-side registry of custom logit processors.

A client picks a processor by NAME (`custom_logit_processor`) and passes it plain data (`custom_params`); no
client code ever runs on the server. The server operator adds processors at start-up with
`--custom-logit-processor NAME=module:attr`, which imports `attr` from `module` once (importlib).

A processor is built once per request, by the worker's runner alone: `factory(custom_params, tokenizer)`, then
called for each of that request's next tokens as `proc(output_token_ids, logits)` with the request's row of
logits ([vocab_size]). It returns the new row (it may modify and return the row it was given). Processors run on
the host between the forward and the sampler, so a step with a processor row cannot overlap the next one (the
runner syncs).

The HTTP server checks a request's processor before submitting it, without building it (`check`): the name, and
the params through the factory's `check_params(custom_params, tokenizer)` when it has one (ValueError: HTTP 400
naming custom_params). A factory without one is checked when the worker builds it: a refusal there ends that
request with an "invalid" error (HTTP 400 too), never the worker.

torch is imported only where tensors are touched: the HTTP server imports this module for the registry.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from tokenizers import Tokenizer

if TYPE_CHECKING:
    import torch

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


class LogitProcessor(Protocol):
    """One request's processor: the logits of its next token, given the tokens it generated so far."""

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor: ...


# Built once per request as factory(custom_params, tokenizer); a class with that constructor is one.
LogitProcessorFactory = Callable[[dict[str, Any], Tokenizer], LogitProcessor]


def single_token_id(tokenizer: Tokenizer, text: str) -> int:
    """The id of the one token that spells `text`; ValueError if the tokenizer needs more or has none."""
    tid = tokenizer.token_to_id(text)
    if tid is not None:
        return int(tid)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) != 1:
        raise ValueError(f"the tokenizer has no single token for {text!r} (it encodes to {ids}); "
                         "this logit processor needs a tokenizer from the DeepSeek-R1 family")
    return int(ids[0])


def _force(logits: torch.Tensor, token_id: int) -> torch.Tensor:
    """Make `token_id` the only choice: every other logit -inf (in place, no host sync)."""
    logits.fill_(float("-inf"))
    logits[token_id] = 0.0
    return logits


class DeepSeekR1ThinkingBudget:
    """Caps R1's reasoning at `thinking_budget` tokens, then forces "\\n</think>" and steps aside.

    The R1 chat template opens `<think>` in the prompt, so every output token is reasoning until `</think>`.
    Stateless in the history it is given (so it resumes exactly after a preemption); it only remembers how far
    it has scanned for `</think>`, to keep each call O(new tokens).
    """

    name = "deepseek_r1_thinking_budget"

    def __init__(self, custom_params: dict[str, Any], tokenizer: Tokenizer) -> None:
        self.check_params(custom_params, tokenizer)
        self.thinking_budget: int = custom_params["thinking_budget"]
        self.newline_id = single_token_id(tokenizer, "\n")
        self.end_think_id = single_token_id(tokenizer, "</think>")
        self._scanned = 0  # output tokens already searched for </think>
        self._ended = False

    @classmethod
    def check_params(cls, custom_params: dict[str, Any], tokenizer: Tokenizer) -> None:
        """ValueError unless `custom_params` is {"thinking_budget": int >= 0} and the tokenizer has its tokens."""
        unknown = sorted(set(custom_params) - {"thinking_budget"})
        if unknown:
            raise ValueError(f"{cls.name}: unknown custom_params {unknown}; it accepts only 'thinking_budget'")
        budget = custom_params.get("thinking_budget")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ValueError(f"{cls.name}: custom_params 'thinking_budget' must be an integer >= 0, "
                             f"got {budget!r}")
        single_token_id(tokenizer, "\n")
        single_token_id(tokenizer, "</think>")

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        n = len(output_token_ids)
        if n < self._scanned:  # a shorter history than last time: start over
            self._scanned, self._ended = 0, False
        if not self._ended:
            self._ended = self.end_think_id in output_token_ids[self._scanned :]
            self._scanned = n
        if self._ended or n < self.thinking_budget:
            return logits
        # NOTE: the token at index `thinking_budget` is the forced newline, so any later one is </think>.
        return _force(logits, self.newline_id if n == self.thinking_budget else self.end_think_id)


BUILTIN_PROCESSORS: dict[str, LogitProcessorFactory] = {
    DeepSeekR1ThinkingBudget.name: DeepSeekR1ThinkingBudget,
}


class LogitProcessorRegistry:
    """Processors a request may name: the built-ins plus the operator's `--custom-logit-processor` entries."""

    def __init__(self, specs: Sequence[str] = ()) -> None:
        self._factories: dict[str, LogitProcessorFactory] = dict(BUILTIN_PROCESSORS)
        for spec in specs:
            name, module, attr = self.parse_spec(spec)
            self.register(name, _load(module, attr, spec))

    @staticmethod
    def parse_spec(spec: str) -> tuple[str, str, str]:
        """Split "NAME=module:attr" into its three parts; ValueError saying what is wrong."""
        name, eq, target = spec.partition("=")
        module, colon, attr = target.partition(":")
        name, module, attr = name.strip(), module.strip(), attr.strip()
        if not (eq and colon and name and module and attr):
            raise ValueError(f"--custom-logit-processor {spec!r}: expected NAME=module:attr, "
                             "e.g. my_budget=my_pkg.processors:MyBudget")
        if not _NAME.fullmatch(name):
            raise ValueError(f"--custom-logit-processor {spec!r}: name {name!r} must start with a letter or _ "
                             "and hold only letters, digits, '_', '.', '-'")
        return name, module, attr

    def register(self, name: str, factory: LogitProcessorFactory) -> None:
        """Add a processor factory under `name`; ValueError if the name is taken or it is not callable."""
        if name in self._factories:
            raise ValueError(f"logit processor name {name!r} is registered twice; pick another name")
        if not callable(factory):
            raise ValueError(f"logit processor {name!r} is a {type(factory).__name__}, not a class or a "
                             "factory callable as factory(custom_params, tokenizer)")
        self._factories[name] = factory

    def names(self) -> list[str]:
        """The names a request may use, sorted."""
        return sorted(self._factories)

    def check(self, name: str, params: dict[str, Any] | None, tokenizer: Tokenizer) -> None:
        """What `create` would refuse, without building anything: ValueError (an HTTP 400) for an unknown name, or
        for params the factory's `check_params` refuses (a factory without one is checked when it is built)."""
        factory, params = self._factory(name, params)
        check_params = getattr(factory, "check_params", None)
        if check_params is not None:
            self._call(name, check_params, params, tokenizer)

    def create(self, name: str, params: dict[str, Any] | None, tokenizer: Tokenizer) -> LogitProcessor:
        """Build `name` for one request; ValueError (an HTTP 400) for an unknown name or bad params."""
        factory, params = self._factory(name, params)
        proc = self._call(name, factory, params, tokenizer)
        if not callable(proc):
            raise ValueError(f"custom_logit_processor {name!r} built a {type(proc).__name__}, which is not "
                             "callable as proc(output_token_ids, logits)")
        return proc  # type: ignore[no-any-return]

    def _factory(self, name: str, params: dict[str, Any] | None) -> tuple[LogitProcessorFactory, dict[str, Any]]:
        factory = self._factories.get(name)
        if factory is None:
            raise ValueError(f"unknown custom_logit_processor {name!r}; this server has {self.names()}")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise ValueError(f"custom_params must be a JSON object, got {type(params).__name__}")
        return factory, params

    @staticmethod
    def _call(name: str, fn: Callable[..., Any], params: dict[str, Any], tokenizer: Tokenizer) -> Any:
        """fn(params, tokenizer), with the factory's TypeError/KeyError turned into a ValueError naming it."""
        try:
            return fn(params, tokenizer)
        except ValueError:
            raise
        except (TypeError, KeyError) as e:
            raise ValueError(f"custom_logit_processor {name!r} rejected custom_params: {e!r}") from e


def _load(module: str, attr: str, spec: str) -> LogitProcessorFactory:
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"--custom-logit-processor {spec!r}: cannot import module {module!r}: {e}") from e
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--custom-logit-processor {spec!r}: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"--custom-logit-processor {spec!r}: {module}:{attr} is a {type(obj).__name__}, "
                         "not a class or a factory callable as factory(custom_params, tokenizer)")
    return obj  # type: ignore[no-any-return]


def apply_logit_processors(logits: torch.Tensor, rows: list[tuple[int, LogitProcessor, list[int]]]) -> None:
    """Run each (row, processor, output ids so far) on its row of `logits` [n, vocab], in place."""
    import torch

    vocab = logits.shape[-1]
    for row, proc, output_ids in rows:
        view = logits[row]  # [vocab]
        out = proc(output_ids, view)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (vocab,):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"logit processor {type(proc).__name__} returned {got}, expected a tensor of "
                             f"shape ({vocab},)")
        if out.data_ptr() != view.data_ptr():
            view.copy_(out)


class FailedProcessor:
    """Stands in for a custom logit processor that could not be built; its request ends with the error."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        raise ValueError(self.message)


class GuardedProcessor:
    """A request's logit processor whose failure (an exception, or a result of the wrong shape) is recorded
    against its row instead of propagating: that request ends with an error, the batch goes on."""

    def __init__(self, row: int, proc: Any, errors: list[tuple[int, str]]) -> None:
        self.row, self.proc, self.errors = row, proc, errors

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        import torch  # NOTE: lazily: the HTTP layer imports this module and never torch

        try:
            out = self.proc(output_token_ids, logits)
            if not isinstance(out, torch.Tensor) or out.shape != logits.shape:
                raise ValueError(f"it returned {type(out).__name__} {getattr(out, 'shape', '')}, not logits of shape {tuple(logits.shape)}")
            return out
        except Exception as e:
            self.errors.append((self.row, f"the custom logit processor failed: {e}"))
            return logits
