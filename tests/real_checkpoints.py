"""Tiny checkpoints made from the *published* files of real models (tests/fixtures/real/, each folder's SOURCES.md
names the repository, commit, licence and sha256 of every file): the real config.json with only its layer sizes
shrunk (vocabulary, special token ids, image size, patch, merge, window and rope settings kept), the real
tokenizer, template, processor and generation files byte for byte, and random weights.

Public API (tests/ is on sys.path):

- `PUBLISHED`: the model folders of the corpus, by name.
- `published_files(name, out_dir) -> Path`: the folder's files as the model's repository holds them (the
  shared Qwen BPE vocabulary added where SOURCES.md says the model publishes it; `.gz` copies unpacked).
- `build_from_published(name, out_dir, seed=0) -> Path`: those files, config.json shrunk, random safetensors
  weights (transformers' own model class, saved with `save_pretrained`, with extra noise so norms and biases
  are not trivial). config.json and generation_config.json stay in the published layout: transformers'
  re-saved copies are not kept.
"""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
from pathlib import Path

import torch

from tiny_checkpoints import perturb

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "real"
QWEN_BPE = {"vocab.json": "qwen2-bpe/vocab.json.gz", "merges.txt": "qwen2-bpe/merges.txt.gz"}
# name -> files published beside the folder's own (byte-identical across the Qwen models: SOURCES.md)
PUBLISHED = {
    "Qwen2.5-VL-7B-Instruct": QWEN_BPE,
    "Qwen2.5-VL-7B-Instruct-a22b9b2": QWEN_BPE,  # the first published revision (another tokenizer template)
    "Qwen3-VL-4B-Instruct": QWEN_BPE,
    "Qwen2.5-7B-Instruct": QWEN_BPE,
    "llava-1.5-7b-hf": {},
    "Qwen2-VL-2B-Instruct": {},  # its own vocab.json (one trailing newline more than the shared copy: SOURCES.md)
    "SmolVLM-256M-Instruct": {},
}

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
HEAD_DIM = TEXT["hidden_size"] // TEXT["num_attention_heads"]
# Vision towers: width 32, 2 heads, few blocks; what sets token counts (image size, patch, merge, window) is kept.
QWEN_VISION = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT["hidden_size"])
IDEFICS3_VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=3)
CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=3, projection_dim=32)


def _copy(src: Path, dst: Path) -> None:
    if src.suffix == ".gz":
        with gzip.open(src, "rb") as f, open(dst.with_suffix(""), "wb") as out:
            shutil.copyfileobj(f, out)
    else:
        shutil.copyfile(src, dst)


def published_files(name: str, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for src in sorted((FIXTURES / name).iterdir()):
        if src.name != "SOURCES.md":
            _copy(src, out / src.name)
    for file, shared in PUBLISHED.get(name, {}).items():
        _copy(FIXTURES / shared, out / (file + ".gz"))
    return out


def _mrope_section(rope: dict) -> None:
    """Shrink an M-RoPE section (temporal, height, width) to the tiny head: same proportions, summing to
    head_dim / 2."""
    if "mrope_section" in rope:
        rope["mrope_section"] = [2, 3, 3]


def shrink(config: dict) -> dict:
    """The published config with layer sizes made tiny; every field that decides token ids, image grids or
    positions is left as published."""
    cfg = json.loads(json.dumps(config))
    mt = cfg["model_type"]
    text = cfg.get("text_config") if "text_config" in cfg else cfg  # transformers-4 Qwen2.5-VL: text fields on top
    if mt == "llava":
        text.update(TEXT, head_dim=HEAD_DIM)
        cfg["vision_config"].update(CLIP_VISION)
    elif mt == "idefics3":  # the tile size, patch and scale factor (tokens per tile) stay as published
        text.update(TEXT, head_dim=HEAD_DIM)
        cfg["vision_config"].update(IDEFICS3_VISION)
    elif mt in ("qwen2_5_vl", "qwen3_vl", "qwen2_vl", "qwen2", "qwen3"):
        text.update(TEXT)
        if "head_dim" in text:
            text["head_dim"] = HEAD_DIM
        if "max_window_layers" in text:
            text["max_window_layers"] = TEXT["num_hidden_layers"]
        for holder in (text, cfg):
            for key in ("rope_scaling", "rope_parameters"):
                if isinstance(holder.get(key), dict):
                    _mrope_section(holder[key])
        vision = cfg.get("vision_config")
        if vision is not None and mt == "qwen2_vl":  # Qwen2-VL: `embed_dim` is the width, `hidden_size` the output
            vision.update(depth=3, embed_dim=32, num_heads=2, hidden_size=TEXT["hidden_size"])
        elif vision is not None:
            vision.update(QWEN_VISION)
            if "fullatt_block_indexes" in vision:
                vision["fullatt_block_indexes"] = [1]  # windows in blocks 0 and 2, whole images in 1
            if "deepstack_visual_indexes" in vision:
                vision["deepstack_visual_indexes"] = [0, 1]
    else:
        raise ValueError(f"no tiny sizes for model_type {mt!r}")
    return cfg


def build_from_published(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    import transformers as t

    out = published_files(name, out_dir)
    published = json.loads((out / "config.json").read_text())
    tiny = shrink(published)
    (out / "config.json").write_text(json.dumps(tiny, indent=2))
    config = t.AutoConfig.from_pretrained(out)
    torch.manual_seed(seed)
    vlm = "vision_config" in tiny
    model = (t.AutoModelForImageTextToText if vlm else t.AutoModelForCausalLM).from_config(config).float().eval()
    perturb(model, seed, scale=0.02)
    with tempfile.TemporaryDirectory() as saved:
        model.save_pretrained(saved)
        for weights in Path(saved).glob("*.safetensors*"):
            shutil.copyfile(weights, out / weights.name)
    return out
