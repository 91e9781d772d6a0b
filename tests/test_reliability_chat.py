"""Chat templates are bounded: a render past the time limit, or a hostile `*` / `**`, fails its own request."""

import time

import jinja2
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


BIG = [{"role": "user", "content": "qwertyuiop" * 300_000}]  # 3M characters: under MAX_STRING


@pytest.mark.parametrize(
    "template, why",
    [
        ("{{ messages[0].content.replace('', 'x' * 1000) }}", "str.replace would build"),
        ("{{ 'a'.center(900000000) }}", "str.center would build 900,000,000"),
        ("{{ 'a'.ljust(10**9) ~ 'b'.zfill(10**9) }}", "str.ljust would build"),
        ("{{ ('\t' * 1000).expandtabs(10**7) }}", "str.expandtabs would build"),
        ("{{ '{:900000000}'.format('a') }}", "str.format would build"),
        ("{{ '%900000000s'|format('a') }}", "the 'format' filter would build"),
        ("{{ '%900000000s' % 'a' }}", "'%' would build"),
        ("{{ '%s' % ('x' * 10**12) }}", "'\\*' would build"),
        ("{{ 'a'|center(10**9) }}", "the 'center' filter would build"),
        ("{{ ('\n' * 1000000)|indent(100) }}", "the 'indent' filter would build"),
        ("{{ messages[0].content|replace('q', 'x' * 100) }}", "the 'replace' filter would build"),
        ("{{ messages[0].content|sort|join }}", "the 'sort' filter on 3,000,000 items"),
        ("{{ messages[0].content|unique|list }}", "the 'unique' filter on"),
        ("{{ messages[0].content|batch(1)|list }}", "the 'batch' filter on"),
        ("{{ ([messages[0].content] * 2)|join }}", "the 'join' filter would build 6,000,000"),
        ("{{ messages[0].content + messages[0].content }}", "'\\+' would build 6,000,000"),
        (
            "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
            "'~' would build",
        ),
        ("{% for i in range(3) %}{{ messages[0].content }}{% endfor %}", "the rendered prompt would build"),
    ],
)
def test_templates_cannot_build_huge_strings(template, why):
    """Each would allocate gigabytes (or run a C-level sort far past the time limit): refused before it
    runs, naming the operation (the message says what it would have built)."""
    with pytest.raises(ChatTemplateError, match=why):
        render_chat(template, BIG, template_name="bomb.jinja")


def test_bounded_operations_still_render_like_jinja():
    tmpl = (
        "{{ [3, 1, 2]|sort|join(',') }}|{{ {'b': 1, 'a': 2}|dictsort }}|{{ 'ab'|list }}|{{ [1, 2, 3]|batch(2)|list }}"
        "|{{ 'x\ny'|indent(2) }}|{{ 'a'|center(5) }}|{{ '%s-%d'|format('a', 3) }}|{{ 'aXb'|replace('X', '--') }}"
        "|{{ 'a'.center(3, '*') }}|{{ 'k'.join(['1', '2']) }}|{{ '%s/%s' % ('p', 'q') }}|{{ 'a' ~ 1 ~ none }}"
        "|{{ [1] + [2] }}|{{ 'ab'.replace('', '.') }}|{{ '{}:{}'.format('m', 2) }}|{{ [4, 5]|unique|list }}"
    )
    expected = (
        "1,2,3|[('a', 2), ('b', 1)]|['a', 'b']|[[1, 2], [3]]|x\n  y|  a  |a-3|a--b|*a*|1k2|p/q|a1None|[1, 2]|.a.b.|m:2"
        "|[4, 5]"
    )
    assert render_chat(tmpl, MSGS)[0] == jinja2.Environment().from_string(tmpl).render() == expected
