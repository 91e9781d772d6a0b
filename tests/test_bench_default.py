"""The embedded benchmark and the demo checkpoint: deterministic, valid, readable by transformers."""

import hashlib
import json
import sys
from pathlib import Path

from cultengine.bench import data, default, demo_checkpoint


def digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def test_default_bench_is_deterministic_and_valid(tmp_path):
    a, b = default.build(tmp_path / "a"), default.build(tmp_path / "b")
    assert digest(a.parent) == digest(b.parent)
    ds = data.load([a])
    assert not ds.skipped and 150 <= len(ds.rows) <= 300
    assert {r.continent for r in ds.rows} == {"Africa", "Asia", "Europe", "North America", "South America", "Oceania"}
    assert {r.question_type for r in ds.rows} == {"image_recognition", "scene_understanding", "cultural_knowledge"}
    assert all(r.region and r.category and r.answer is not None for r in ds.rows)
    assert any(not r.images for r in ds.rows) and any(r.images for r in ds.rows)


def test_demo_checkpoint_is_deterministic(tmp_path):
    a, b = demo_checkpoint.ensure(tmp_path / "a"), demo_checkpoint.ensure(tmp_path / "b")
    assert digest(a) == digest(b)
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"] and cfg["cultengine_demo"]
    assert demo_checkpoint.ensure(tmp_path / "a") == a  # cached


def test_demo_checkpoint_loads_in_transformers(tmp_path, monkeypatch):
    # the repository's top-level `kernels` link would shadow the Hub `kernels` package transformers probes
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != repo])
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "kernels", raising=False)
    import torch
    import transformers
    from PIL import Image

    path = demo_checkpoint.ensure(tmp_path)
    model, info = transformers.LlavaForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    proc = transformers.AutoProcessor.from_pretrained(path)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which flag is this?"}]}]
    text = proc.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\n<image>\nWhich flag is this?<|im_end|>\n<|im_start|>assistant\n"
    inputs = proc(images=Image.new("RGB", (150, 100), "red"), text=text, return_tensors="pt")
    image_id = json.loads((path / "config.json").read_text())["image_token_index"]
    assert int((inputs["input_ids"] == image_id).sum()) == 49
    with torch.no_grad():
        assert model(**inputs).logits.shape[-1] == model.config.text_config.vocab_size
