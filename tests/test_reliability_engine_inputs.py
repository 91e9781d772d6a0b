"""Hostile images and chat templates fail their own request only (through `load_image` and `render_chat`):
the good requests of the same call are unchanged and the engine stays usable."""

import io
import shutil

import pytest
from PIL import Image

from cultengine import Engine, SamplingParams, chat
from test_reliability_image import png_header
from tiny_checkpoints import IMAGE_TOKEN

TEMPLATE = (
    "{% set text = messages[0].content %}"
    "{% if text == 'overflow' %}{{ 1.5 ** 100000 }}"
    "{% elif text == 'loop' %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    "{% else %}USER: {{ text }} ASSISTANT:{% endif %}"
)


def _png(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 30, 60)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def engine(tiny_llama, tmp_path_factory):
    ckpt = shutil.copytree(tiny_llama, tmp_path_factory.mktemp("hostile") / "ckpt")
    (ckpt / "chat_template.jinja").write_text(TEMPLATE)
    return Engine(ckpt, dtype="float32", max_model_len=128)


def test_hostile_images_and_templates_fail_alone(engine, monkeypatch):
    monkeypatch.setattr(chat, "RENDER_TIME_LIMIT_S", 0.2)
    good = [
        {"prompt": f"{IMAGE_TOKEN} which flag?", "images": [_png((20, 16))]},
        {"messages": [{"role": "user", "content": "hello"}]},
    ]
    bad = [
        ({"prompt": f"{IMAGE_TOKEN} x", "images": [123]}, "unsupported image"),
        ({"prompt": f"{IMAGE_TOKEN} x", "images": [None]}, "unsupported image"),
        ({"prompt": f"{IMAGE_TOKEN} x", "images": [png_header(60000, 60000)]}, "decompression bomb"),
        ({"prompt": f"{IMAGE_TOKEN} x", "images": [_png((1, 60000))]}, "aspect ratio"),
        ({"messages": [{"role": "user", "content": "overflow"}]}, "OverflowError"),
        ({"messages": [{"role": "user", "content": "loop"}]}, "did not finish rendering within 0.2 s"),
    ]
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    solo = [engine.generate([g], params, use_tqdm=False)[0].token_ids for g in good]
    outs = engine.generate([good[0], *(b for b, _ in bad), good[1]], params, use_tqdm=False)
    assert [outs[0].token_ids, outs[-1].token_ids] == solo
    for out, (_, needle) in zip(outs[1:-1], bad, strict=True):
        assert out.error and needle in out.error, out.error
    assert "chat template of" in outs[-2].error  # names the template
    scores = engine.score([{**bad[0][0], "choices": ["a"]}, {**good[0], "choices": ["a", "b"]}], use_tqdm=False)
    assert "unsupported image" in scores[0].error and scores[1].error is None
    assert engine.generate([good[1]], params, use_tqdm=False)[0].token_ids == solo[1]
