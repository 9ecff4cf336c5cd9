"""Chat templates: messages + tools + kwargs -> prompt text, rendered in a sandboxed jinja2 environment.

A template comes from `--chat-template` (a built-in name or a path to a .jinja file) or from the
checkpoint (`tokenizer_config.json`'s `chat_template`, a string or a list of named templates, or a
`chat_template.jinja` file beside it). The environment matches the one Hugging Face renders checkpoint
templates in (trim_blocks, lstrip_blocks, loop controls, a `tojson` that keeps non-ASCII text), so a
checkpoint's template renders here exactly as it does with `apply_chat_template`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from baleen.api.errors import ApiError
from baleen.model.tokenizer_build import templates_dir

BUILTIN_TEMPLATES = {
    "deepseek-v3": "deepseek_v3.jinja",
    "deepseek-r1": "deepseek_r1.jinja",
    "deepseek-v31": "deepseek_v31.jinja",
}
DEEPSEEK_BOS = "<｜begin▁of▁sentence｜>"
DEEPSEEK_EOS = "<｜end▁of▁sentence｜>"


def _tojson(value: Any, indent: int | None = None, separators: tuple[str, str] | None = None,
            sort_keys: bool = False, ensure_ascii: bool = False) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML, which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict with "content"."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


class ChatTemplate:
    """A compiled chat template (or a set of named ones, as tokenizer_config.json may hold)."""

    def __init__(
        self,
        source: str | Mapping[str, str],
        *,
        bos_token: str = DEEPSEEK_BOS,
        eos_token: str = DEEPSEEK_EOS,
        name: str = "custom",
    ) -> None:
        sources = {"default": source} if isinstance(source, str) else dict(source)
        if not sources:
            raise ValueError(f"chat template {name!r} holds no template")
        env = _environment()
        self._templates: dict[str, jinja2.Template] = {}
        for key, text in sources.items():
            try:
                self._templates[key] = env.from_string(text)
            except jinja2.TemplateSyntaxError as e:
                raise ValueError(f"chat template {name!r} ({key}) has a syntax error at line {e.lineno}: "
                                 f"{e.message}") from e
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token

    @classmethod
    def builtin(cls, name: str) -> ChatTemplate:
        """One of the templates shipped with baleen: deepseek-v3, deepseek-r1, deepseek-v31."""
        file = BUILTIN_TEMPLATES.get(name)
        if file is None:
            raise ValueError(f"unknown built-in chat template {name!r}; choose one of {sorted(BUILTIN_TEMPLATES)} "
                             "or give the path of a .jinja file")
        text = (templates_dir() / file).read_text(encoding="utf-8")
        return cls(text, name=name)

    @classmethod
    def from_spec(cls, spec: str, *, bos_token: str = DEEPSEEK_BOS, eos_token: str = DEEPSEEK_EOS) -> ChatTemplate:
        """What `--chat-template` names: a built-in name, or the path of a jinja file."""
        if spec in BUILTIN_TEMPLATES:
            return cls.builtin(spec)
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"--chat-template {spec!r} is neither a built-in ({sorted(BUILTIN_TEMPLATES)}) "
                             "nor an existing file")
        return cls(path.read_text(encoding="utf-8"), bos_token=bos_token, eos_token=eos_token, name=str(path))

    @classmethod
    def from_checkpoint(cls, model_path: str | Path) -> ChatTemplate | None:
        """The template a checkpoint ships (tokenizer_config.json, else chat_template.jinja), or None."""
        root = Path(model_path)
        config: dict[str, Any] = {}
        config_file = root / "tokenizer_config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{config_file} is not valid JSON: {e}") from e
        bos = _token_text(config.get("bos_token")) or DEEPSEEK_BOS
        eos = _token_text(config.get("eos_token")) or DEEPSEEK_EOS
        source = config.get("chat_template")
        if source is None and (root / "chat_template.jinja").is_file():
            source = (root / "chat_template.jinja").read_text(encoding="utf-8")
        if source is None:
            return None
        if isinstance(source, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
            try:
                source = {str(t["name"]): str(t["template"]) for t in source}
            except (KeyError, TypeError) as e:
                raise ValueError(f"{config_file}: chat_template list entries need 'name' and 'template'") from e
        if not isinstance(source, str | dict):
            raise ValueError(f"{config_file}: chat_template must be a string or a list of named templates")
        return cls(source, bos_token=bos, eos_token=eos, name=str(root))

    @classmethod
    def load(cls, spec: str | None, model_path: str | Path | None, *, fallback: str = "deepseek-v3") -> ChatTemplate:
        """The serving template: `--chat-template` if given, else the checkpoint's, else the built-in `fallback`."""
        if spec:
            return cls.from_spec(spec)
        found = cls.from_checkpoint(model_path) if model_path is not None else None
        return found if found is not None else cls.builtin(fallback)

    @property
    def names(self) -> list[str]:
        """Names of the templates held (one "default" unless the checkpoint lists several)."""
        return list(self._templates)

    def _pick(self, tools: Sequence[Mapping[str, Any]] | None) -> jinja2.Template:
        # Hugging Face's rule for named templates: "tool_use" when tools are given and it exists.
        if tools and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" in self._templates:
            return self._templates["default"]
        if len(self._templates) == 1:
            return next(iter(self._templates.values()))
        raise ValueError(f"chat template {self.name!r} has no 'default' among {self.names}")

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """The prompt text; ApiError(400) when the template rejects the conversation."""
        template = self._pick(tools)
        context = {"bos_token": self.bos_token, "eos_token": self.eos_token, **kwargs}
        context.update(messages=list(messages), tools=list(tools) if tools else None,
                       add_generation_prompt=add_generation_prompt)
        try:
            return template.render(context)
        except jinja2.TemplateError as e:
            raise ApiError(400, f"the chat template rejected the conversation: {e}", param="messages") from e
        except (TypeError, AttributeError, KeyError, IndexError) as e:  # a template reading a missing field
            raise ApiError(400, f"the chat template could not render the conversation: {e!r}",
                           param="messages") from e
