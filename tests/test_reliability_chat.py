"""Chat templates are bounded: a render past the time limit, or a hostile `*` / `**`, fails its own request."""

import time

import pytest

from cultengine import chat
from cultengine.chat import ChatTemplateError, render_chat

MSGS = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "template",
    [
        # 10^10 empty iterations: no output, no call, only the loops themselves
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        # the same over a string built by the template
        "{% set s = 'ab' * 50000 %}{% for a in s %}{% for b in s %}{{ b }}{% endfor %}{% endfor %}",
        # exponential recursion through a macro
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    ],
)
def test_render_running_past_the_limit_is_a_chat_template_error(template):
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateError, match=r"my-template did not finish rendering within 0.2 s"):
        render_chat(template, MSGS, template_name="my-template", time_limit=0.2)
    assert time.perf_counter() - t0 < 5


def test_default_limit_and_name(monkeypatch):
    monkeypatch.setattr(chat, "RENDER_TIME_LIMIT_S", 0.1)
    with pytest.raises(ChatTemplateError, match="the chat template did not finish"):
        render_chat("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", MSGS)
    # the deadline belongs to one render: the next one has its own
    assert render_chat("{% for m in messages %}{{ m.content }}{% endfor %}", MSGS)[0] == "hi"


@pytest.mark.parametrize(
    "template, why",
    [
        ("{{ 'a' * 10**9 }}", "would build 1,000,000,000 items"),
        ("{{ [1] * 10**9 }}", "would build"),
        ("{{ 10 ** 100000000 }}", "would compute a number"),
        ("{{ 1.5 ** 100000 }}", "OverflowError"),
        ("{{ 1 // 0 }}", "ZeroDivisionError"),
        ("{{ raise_exception('nope') }}", "nope"),
    ],
)
def test_template_failures_are_chat_template_errors_naming_it(template, why):
    with pytest.raises(ChatTemplateError, match=why) as e:
        render_chat(template, MSGS, template_name="tmpl.jinja")
    assert "tmpl.jinja" in str(e.value)


def test_loops_still_render_like_jinja():
    tmpl = (
        "{% for m in messages %}{{ loop.index }}/{{ loop.length }}:{{ m.content }}"
        "{% if not loop.last %},{% endif %}{% else %}none{% endfor %}"
        "{% for k, v in {'a': 1}.items() %}[{{ k }}={{ v }}]{% endfor %}"
        "{% for x in [1, 2, 3] if x > 1 %}{{ x * 2 }}{% endfor %}{{ 2 ** 10 }}{{ '-' * 3 }}"
    )
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert render_chat(tmpl, msgs)[0] == "1/2:a,2/2:b[a=1]46" + "1024---"
