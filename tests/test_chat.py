"""Chat-template rendering, against transformers' apply_chat_template(tokenize=False)."""

from __future__ import annotations

import pytest
import transformers
from PIL import Image

from cultengine.chat import ChatTemplateError, render_chat, render_checkpoint_chat
from cultengine.checkpoint import load_checkpoint

IMG = Image.new("RGB", (8, 8), (10, 20, 30))

CONVERSATIONS = [
    [{"role": "user", "content": "Bonjour, ça va? 日本語"}],
    [
        {"role": "system", "content": "You are helpful."},
        {
            "role": "user",
            "content": [{"type": "image", "image": IMG}, {"type": "text", "text": "What festival is this?"}],
        },
        {"role": "assistant", "content": "Diwali.", "tool_calls": None},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "And these two?"},
                {"type": "image", "image": b"\x89PNG..."},
                {"type": "image", "path": "/tmp/b.jpg"},
            ],
        },
    ],
]

# Exercises what the environment must provide: trim/lstrip blocks, loop controls, tojson (non-ASCII, no
# HTML escaping), namespace, dict(), raise_exception, special tokens from tokenizer_config.
FEATURE_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m['role'] == 'forbidden' %}{{ raise_exception('role not allowed') }}{% endif %}
    {% if m['content'] is string %}
        {% set ns.n = ns.n + 1 %}
<{{ m['role'] }}>{{ m['content'] | tojson }}</{{ m['role'] }}>
    {% else %}
        {% for c in m['content'] %}
            {% if c['type'] == 'text' %}{{ c['text'] }}{% else %}[IMG]{% continue %}{% endif %}
            {% if loop.index > 5 %}{% break %}{% endif %}
        {% endfor %}
    {% endif %}
{% endfor %}
{{ dict(a=1, b='<&>') | tojson }} {{ ns.n }}
{% if add_generation_prompt %}<assistant>{{ eos_token }}{% endif %}"""


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_llama):
    return transformers.AutoTokenizer.from_pretrained(tiny_llama)


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_checkpoint_template_matches_transformers(conv, tiny_llama, hf_tokenizer):
    messages = CONVERSATIONS[conv]
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text, images = render_checkpoint_chat(load_checkpoint(tiny_llama), messages)
    assert text == expected
    assert images == [
        c.get("image", c.get("path"))
        for m in messages
        if isinstance(m["content"], list)
        for c in m["content"]
        if c["type"] == "image"
    ]


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_feature_template_matches_transformers(conv, tiny_llama, hf_tokenizer):
    messages = CONVERSATIONS[conv]
    ckpt = load_checkpoint(tiny_llama)
    for gen in (True, False):
        expected = hf_tokenizer.apply_chat_template(
            messages, chat_template=FEATURE_TEMPLATE, tokenize=False, add_generation_prompt=gen
        )
        text, _ = render_chat(FEATURE_TEMPLATE, messages, ckpt.special_tokens, add_generation_prompt=gen)
        assert text == expected


def test_template_from_tokenizer_config(tiny_qwen2):
    ckpt = load_checkpoint(tiny_qwen2)
    assert not (tiny_qwen2 / "chat_template.jinja").exists() and ckpt.chat_template
    text, images = render_checkpoint_chat(ckpt, CONVERSATIONS[1])
    assert text.startswith("<s><|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert text.count("<image>") == 3 and len(images) == 3


def test_errors():
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_chat(None, CONVERSATIONS[0])
    with pytest.raises(ChatTemplateError, match="role not allowed"):
        render_chat(FEATURE_TEMPLATE, [{"role": "forbidden", "content": "x"}], {"bos_token": "<s>"})
    with pytest.raises(ChatTemplateError):  # the sandbox blocks attribute escapes
        render_chat("{{ ''.__class__.__mro__[1].__subclasses__() }}", CONVERSATIONS[0])
    with pytest.raises(ChatTemplateError, match="non-empty"):
        render_chat("x", [])
    with pytest.raises(ValueError, match="image content item"):
        render_chat("x", [{"role": "user", "content": [{"type": "image"}]}])
