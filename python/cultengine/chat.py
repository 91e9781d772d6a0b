"""Chat-template rendering, identical to transformers' `apply_chat_template(tokenize=False)`.

Chat templates come from the Hub and are untrusted: they run in Jinja's immutable sandbox, and they
only ever see plain JSON data (images become inert "<TypeName>" strings, as in transformers). Rendering
is bounded in time (`RENDER_TIME_LIMIT_S`; every loop iteration and call checks the clock) and `*` / `**`
cannot build huge strings or numbers, so a hostile template fails its own request instead of hanging.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

RENDER_TIME_LIMIT_S = 2.0  # a real template renders a conversation in milliseconds
MAX_REPEAT = 10_000_000  # longest string or list that `*` may build inside a template
MAX_POWER_BITS = 1 << 16  # largest integer (in bits) that `**` may compute inside a template
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


class _OutOfTime(Exception):
    """Raised inside a template whose render passed its deadline."""


_deadline: ContextVar[float] = ContextVar("chat_template_deadline", default=float("inf"))


def _check_deadline() -> None:
    if time.monotonic() > _deadline.get():
        raise _OutOfTime


def _bounded_iter(iterable: Iterable) -> Iterator:
    # Wraps the iterable of every {% for %}: nested loops are where templates spend unbounded time.
    for item in iterable:
        _check_deadline()
        yield item


_DEADLINE_FILTER = "cultengine_deadline"


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, plus a clock check on every call and bounded `*` and `**`."""

    intercepted_binops = frozenset({"*", "**"})

    def call(self, context, obj, /, *args, **kwargs):  # every call of a template goes through here
        _check_deadline()
        return super().call(context, obj, *args, **kwargs)

    def call_binop(self, context, operator, left, right):
        _check_deadline()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(n, int) and len(seq) * n > MAX_REPEAT:
                    raise jinja2.exceptions.SecurityError(f"'*' would build {len(seq) * n:,} items")
        elif isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            if right * abs(left).bit_length() > MAX_POWER_BITS:
                raise jinja2.exceptions.SecurityError(f"'**' would compute a number of over {MAX_POWER_BITS} bits")
        return super().call_binop(context, operator, left, right)


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
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters.update({"tojson": _tojson, _DEADLINE_FILTER: _bounded_iter})
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(), namespace=_TemplateNamespace
    )
    tree = env.parse(template)
    for loop in tree.find_all(jinja2.nodes.For):
        loop.iter = jinja2.nodes.Filter(loop.iter, _DEADLINE_FILTER, [], [], None, None, lineno=loop.lineno)
    return env.from_string(tree)


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


def render_chat(
    template: str | None,
    messages: list[dict],
    special_tokens: dict[str, str] | None = None,
    add_generation_prompt: bool = True,
    *,
    template_name: str = "the chat template",
    time_limit: float | None = None,
    **kwargs: Any,
) -> tuple[str, list[Any]]:
    """Render one conversation; returns (prompt text, image sources in order).

    Any failure of the template (its own errors, a sandbox refusal, a render running past `time_limit`
    seconds, default `RENDER_TIME_LIMIT_S`) is a `ChatTemplateError` naming `template_name`.
    """
    if not template:
        raise ChatTemplateError(
            "this checkpoint has no chat template (no chat_template.jinja and no "
            "'chat_template' in tokenizer_config.json); pass a plain prompt instead"
        )
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
    limit = RENDER_TIME_LIMIT_S if time_limit is None else time_limit
    token = _deadline.set(time.monotonic() + limit)
    try:
        text = compile_template(template).render(
            messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **variables
        )
    except _OutOfTime:
        raise ChatTemplateError(
            f"{template_name} did not finish rendering within {limit:g} s (it loops too long; "
            "the limit is cultengine.chat.RENDER_TIME_LIMIT_S)"
        ) from None
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"error in {template_name}: {e}") from e
    except Exception as e:  # the template is untrusted code: whatever it raises is its own request's error
        raise ChatTemplateError(f"{template_name} failed: {type(e).__name__}: {e}") from e
    finally:
        _deadline.reset(token)
    return text, extract_images(messages)


def render_checkpoint_chat(checkpoint, messages: list[dict], **kwargs: Any) -> tuple[str, list[Any]]:
    """`render_chat` with a loaded `Checkpoint`'s template and special tokens."""
    return render_chat(
        checkpoint.chat_template,
        messages,
        checkpoint.special_tokens,
        template_name=f"the chat template of {checkpoint.path}",
        **kwargs,
    )
