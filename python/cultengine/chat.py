"""Chat-template rendering, identical to transformers' `apply_chat_template(tokenize=False)`.

Chat templates come from the Hub and are untrusted: they run in Jinja's immutable sandbox, and they
only ever see plain JSON data (images become inert "<TypeName>" strings, as in transformers).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

IMAGE_KEYS = ("image", "url", "path")  # where a {"type": "image"} item may carry its source
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """No chat template, or the template rejected the conversation."""


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes; transformers overrides it with plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    # Only construction, so templates cannot reach dict internals through it.
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # Rejects underscore names so a template cannot store or reach dunder attributes.
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore names ({name!r})")


class _GenerationTag(jinja2.ext.Extension):
    # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering ignores it.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace)
    return env.from_string(template)


def _plain(value: Any) -> Any:
    """Rebuild template input from plain JSON types; anything else becomes "<TypeName>" (as transformers)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and type(value).__module__ == "numpy":  # numpy scalar
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def extract_images(messages: list[dict]) -> list[Any]:
    """The image sources of `{"type": "image", ...}` content items, in order of appearance."""
    images = []
    for msg in messages:
        content = msg.get("content")
        if not isinstance(content, list):
            continue
        for item in content:
            if isinstance(item, Mapping) and item.get("type") == "image":
                src = next((item[k] for k in IMAGE_KEYS if item.get(k) is not None), None)
                if src is None:
                    raise ValueError(f"image content item has none of the keys {IMAGE_KEYS}: {item!r}")
                images.append(src)
    return images


def render_chat(template: str | None, messages: list[dict], special_tokens: dict[str, str] | None = None,
                add_generation_prompt: bool = True, **kwargs: Any) -> tuple[str, list[Any]]:
    """Render one conversation; returns (prompt text, image sources in order)."""
    if not template:
        raise ChatTemplateError("this checkpoint has no chat template (no chat_template.jinja and no "
                                "'chat_template' in tokenizer_config.json); pass a plain prompt instead")
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    chat = []
    for msg in messages:
        if not isinstance(msg, Mapping):
            raise ChatTemplateError(f"chat messages must be dicts, got {msg!r}")
        # transformers drops None-valued keys (OpenAI clients send content=None) before rendering.
        msg = _plain({k: v for k, v in msg.items() if v is not None})
        reasoning = next((msg[k] for k in _REASONING_FIELDS if msg.get(k) is not None), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        chat.append(msg)
    variables = _plain({**(special_tokens or {}), **kwargs})
    try:
        text = compile_template(template).render(messages=chat, tools=None, documents=None,
                                                 add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template error: {e}") from e
    return text, extract_images(messages)


def render_checkpoint_chat(checkpoint, messages: list[dict], **kwargs: Any) -> tuple[str, list[Any]]:
    """`render_chat` with a loaded `Checkpoint`'s template and special tokens."""
    return render_chat(checkpoint.chat_template, messages, checkpoint.special_tokens, **kwargs)
