"""Chat-template rendering, identical to transformers' `apply_chat_template(tokenize=False)`.

Chat templates come from the Hub and are untrusted: they run in Jinja's immutable sandbox, and they
only ever see plain JSON data (images become inert "<TypeName>" strings, as in transformers). Rendering
is bounded in time (`RENDER_TIME_LIMIT_S`; every loop iteration and call checks the clock) and in size:
every way a template builds a string or list in one step (`*`, `+`, `~`, `%`, the string methods and
filters that pad, replace, join or format, sorting) is checked against `MAX_STRING` before it allocates,
`**` against `MAX_POWER_BITS`, and the rendered text against `MAX_STRING` as it streams out. A hostile
template fails its own request instead of hanging the server or exhausting its memory.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.visitor
from jinja2.sandbox import ImmutableSandboxedEnvironment

RENDER_TIME_LIMIT_S = 2.0  # a real template renders a conversation in milliseconds
MAX_STRING = 4_000_000  # longest string or list a template may build, its output included (~1M tokens)
MAX_ITEMS = 100_000  # most items the item-wise filters (sort, unique, list, batch...) may take, as they
# run per item in Python without the clock (a real template sorts a few tools or messages)
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


def _too_big(n: int, what: str) -> None:
    if n > MAX_STRING:
        raise jinja2.exceptions.SecurityError(
            f"{what} would build {n:,} items, over cultengine.chat.MAX_STRING ({MAX_STRING:,})"
        )


def _size(x: Any) -> int:
    return len(x) if isinstance(x, str | list | tuple | dict) else len(str(x)) if isinstance(x, int | float) else 0


_WIDTH = re.compile(r"\d+")


def _check_format(fmt: Any, args: Iterable, what: str) -> None:
    # `'%900000000s' % x`, `'{:900000000}'.format(x)`: every number in a format string may be a width.
    if isinstance(fmt, str):
        widths = sum(int(m) for m in _WIDTH.findall(fmt))
        _too_big(len(fmt) + widths + sum(_size(a) for a in args), what)


def _replaced_size(s: str, old: Any, new: Any, count: Any = -1) -> int:
    if not isinstance(s, str) or not isinstance(old, str) or not isinstance(new, str):
        return 0
    hits = len(s) + 1 if old == "" else s.count(old)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(0, len(new) - len(old))


def _joined_size(sep: Any, items: Any) -> int:
    if not isinstance(items, list | tuple):
        return 0
    return sum(_size(i) for i in items) + _size(sep) * max(0, len(items) - 1)


# str methods that can build a string far larger than their inputs, and the size each would build
_STR_METHODS: dict[str, Callable[..., int]] = {
    "center": lambda s, width=0, *a: width if isinstance(width, int) else 0,
    "ljust": lambda s, width=0, *a: width if isinstance(width, int) else 0,
    "rjust": lambda s, width=0, *a: width if isinstance(width, int) else 0,
    "zfill": lambda s, width=0: width if isinstance(width, int) else 0,
    "expandtabs": lambda s, tabsize=8: len(s) + s.count("\t") * (tabsize if isinstance(tabsize, int) else 0),
    "replace": _replaced_size,
    "join": _joined_size,
}


def _bounded_filter(name: str, size: Callable[..., int], original: Callable) -> Callable:
    limit = MAX_ITEMS if name in _ITEMWISE else None

    def bounded(*args, **kwargs):
        _check_deadline()
        n = size(*args, **kwargs)
        if limit is not None and n > limit:
            raise jinja2.exceptions.SecurityError(
                f"the '{name}' filter on {n:,} items, over cultengine.chat.MAX_ITEMS ({limit:,})"
            )
        _too_big(n, f"the '{name}' filter")
        return original(*args, **kwargs)

    if hasattr(original, "jinja_pass_arg"):  # Jinja passes the environment or context to filters marked so
        bounded.jinja_pass_arg = original.jinja_pass_arg
    return bounded


_ITEMWISE = {"sort", "unique", "dictsort", "list", "batch", "slice"}


def _filter_sizes() -> dict[str, Callable[..., int]]:
    """For each filter that can build much more than it is given: the size it would build (its inputs
    as Jinja passes them; an `environment`/`eval_ctx` first argument where the filter takes one)."""

    def skip_ctx(f):
        return lambda ctx, *a, **k: f(*a, **k)

    def fmt(value, *args, **kwargs):
        _check_format(value, [*args, *kwargs.values()], "the 'format' filter")
        return 0

    def indent(s, width=4, first=False, blank=False):
        w = width if isinstance(width, int) else len(width) if isinstance(width, str) else 0
        return len(str(s)) + (str(s).count("\n") + 1) * w

    def items(value, *a, **k):  # sort, unique, list, ...: time and memory grow with the items
        return len(value) if isinstance(value, str | list | tuple | dict) else 0

    def replace(s, old, new, count=None):
        return _replaced_size(str(s), old, new, -1 if count is None else count)

    def join(value, d="", attribute=None):
        return _joined_size(d, list(value) if isinstance(value, list | tuple) else value)

    return {
        "format": fmt,
        "center": lambda value, width=80: width if isinstance(width, int) else 0,
        "indent": indent,
        "replace": skip_ctx(replace),
        "join": skip_ctx(join),
        "sort": skip_ctx(items),
        "unique": skip_ctx(items),
        "dictsort": items,
        "list": skip_ctx(items),
        "batch": items,
        "slice": skip_ctx(items),
        "wordwrap": skip_ctx(lambda s, width=79, *a, **k: len(str(s)) * 2),
    }


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, plus a clock check on every call and every operation that can build a large
    string, list or number checked before it runs."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call(self, context, obj, /, *args, **kwargs):  # every call of a template goes through here
        _check_deadline()
        owner = getattr(obj, "__self__", None)
        if isinstance(owner, str):
            name = getattr(obj, "__name__", "")
            if name in _STR_METHODS:
                _too_big(_STR_METHODS[name](owner, *args, **kwargs), f"str.{name}")
        return super().call(context, obj, *args, **kwargs)

    def wrap_str_format(self, value):  # the sandbox's own path for str.format and str.format_map
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt, name = value.__self__, value.__name__

        def checked(*args, **kwargs):
            _check_format(fmt, [*args, *kwargs.values()], f"str.{name}")
            return wrapped(*args, **kwargs)

        return checked

    def call_binop(self, context, operator, left, right):
        _check_deadline()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(n, int):
                    _too_big(len(seq) * n, "'*'")
        elif operator == "+":
            _too_big(_size(left) + _size(right), "'+'")
        elif operator == "%":
            _check_format(left, right if isinstance(right, tuple) else [right], "'%'")
        elif isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            if right * abs(left).bit_length() > MAX_POWER_BITS:
                raise jinja2.exceptions.SecurityError(f"'**' would compute a number of over {MAX_POWER_BITS} bits")
        return super().call_binop(context, operator, left, right)


def _bounded_concat(*parts: Any) -> str:
    # `a ~ b ~ c`: Jinja joins the parts' strings; doubling a string in a loop would reach gigabytes in
    # a few iterations, well inside the time limit.
    texts = [p if isinstance(p, str) else str(p) for p in parts]
    _too_big(sum(map(len, texts)), "'~'")
    return "".join(texts)


class _BoundConcats(jinja2.visitor.NodeTransformer):
    def visit_Concat(self, node: jinja2.nodes.Concat) -> jinja2.nodes.Node:
        parts = [self.visit(n) for n in node.nodes]
        return jinja2.nodes.Call(
            jinja2.nodes.Name(_CONCAT, "load", lineno=node.lineno), parts, [], None, None, lineno=node.lineno
        )


_CONCAT = "cultengine_concat"


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
    env.filters.update({k: _bounded_filter(k, size, env.filters[k]) for k, size in _filter_sizes().items()})
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(), namespace=_TemplateNamespace
    )
    env.globals[_CONCAT] = _bounded_concat
    tree = _BoundConcats().visit(env.parse(template))
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


def _render_bounded(template: jinja2.Template, variables: dict) -> str:
    """The template's output, refused as soon as it streams past `MAX_STRING` characters."""
    chunks, total = [], 0
    for chunk in template.generate(**variables):
        total += len(chunk)
        _too_big(total, "the rendered prompt")
        chunks.append(chunk)
    return "".join(chunks)


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
            "this checkpoint has no chat template (no chat_template.jinja, chat_template.json or "
            "'chat_template' in tokenizer_config.json / processor_config.json); pass a plain prompt instead"
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
        text = _render_bounded(
            compile_template(template),
            dict(messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **variables),
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


def render_checkpoint_chat(
    checkpoint, messages: list[dict], template: str | None = None, **kwargs: Any
) -> tuple[str, list[Any]]:
    """`render_chat` with a loaded `Checkpoint`'s chat template (the one named `template`, default "default")
    and special tokens."""
    templates = checkpoint.templates
    return render_chat(
        None if templates is None else templates.pick(template),
        messages,
        checkpoint.special_tokens,
        template_name=f"the chat template of {checkpoint.path} ({templates.source if templates else 'none'})",
        **kwargs,
    )
