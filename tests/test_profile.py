"""`cultengine profile` on a tiny checkpoint: the report's figures agree with the workload it ran."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from cultengine import cli
from cultengine.checkpoint import load_checkpoint
from cultengine.models import family_for
from cultengine.profile import preset_checkpoint


def _profile(capsys, *argv) -> dict:
    assert cli.main(["profile", "--device", "cpu", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_generation_report_counts_what_ran(tiny_llama, capsys):
    r = _profile(
        capsys,
        "--model",
        str(tiny_llama),
        "--num-requests",
        "8",
        "--prompts-per-image",
        "4",
        "--output-len",
        "3",
        "--shared-fraction",
        "0",
    )
    assert r["output_tokens_per_s"] * r["wall_seconds"] == pytest.approx(8 * 3)
    assert r["requests_per_s"] * r["wall_seconds"] == pytest.approx(8)
    assert r["images_encoded"] == 2  # 8 requests, 4 per image: each image encoded once
    assert set(r["ttft_ms"]) == {"p50", "p90", "p99"} and r["ttft_ms"]["p50"] > 0
    assert r["steps"] >= 3 and 0 < r["kv_cache_peak_use"] <= 1
    assert set(r["time_breakdown_s"]) == {"scheduler", "vision_encoder", "prefill", "decode", "sampling", "update"}
    assert r["time_breakdown_s"]["prefill"] > 0 and r["time_breakdown_s"]["decode"] > 0


def test_scoring_report(tiny_llama, capsys):
    r = _profile(capsys, "--model", str(tiny_llama), "--num-requests", "4", "--choices", "4", "--shared-fraction", "0")
    assert r["output_tokens_per_s"] == 0 and r["images_encoded"] == 4
    assert r["prefix_cache_hit_rate"] > 0  # choices 2-4 of a question reuse its context


def test_shape_presets_are_real_sizes_in_bfloat16(tmp_path):
    ckpt = load_checkpoint(preset_checkpoint("llava-1.5-7b", tmp_path / "p"), device="meta", random_init=True)
    assert str(ckpt.dtype) == "torch.bfloat16"
    family = family_for(ckpt)
    assert (family.text.hidden_size, family.text.num_layers, family.text.num_heads) == (4096, 32, 32)
    assert (family.vision.image_size, family.vision.patch_size) == (336, 14)


@pytest.mark.parametrize(
    "name,arch,hidden,tiles",
    [
        ("llava-next-7b", "LlavaNextForConditionalGeneration", 4096, 5),
        ("pangea-7b", "LlavaNextForConditionalGeneration", 3584, 5),
        ("llava-onevision-7b", "LlavaOnevisionForConditionalGeneration", 3584, 7),
    ],
)
def test_family_presets_have_real_shapes(tmp_path, name, arch, hidden, tiles):
    ckpt = load_checkpoint(preset_checkpoint(name, tmp_path / "p"), device="meta", random_init=True)
    family = family_for(ckpt)
    assert ckpt.architecture == arch and family.text.hidden_size == hidden
    # A 1000 x 700 photo: the best grid of tiles plus the base tile.
    feats = family.process_image(Image.new("RGB", (1000, 700)), {"num_images": 1})
    assert feats.pixels.shape[0] == tiles and len(feats.token_ids) == feats.num_embeddings > 2 * family.tokens_per_tile


@pytest.mark.parametrize(
    "name,arch,hidden,tiles,tokens_per_tile,billions",
    [
        ("smolvlm2-2.2b", "SmolVLMForConditionalGeneration", 2048, 3 * 4 + 1, 81, 2.25),
        ("internvl3-8b", "InternVLForConditionalGeneration", 3584, 3 * 2 + 1, 256, 7.94),
    ],
)
def test_tiling_presets_have_real_shapes(tmp_path, name, arch, hidden, tiles, tokens_per_tile, billions):
    ckpt = load_checkpoint(preset_checkpoint(name, tmp_path / "p"), device="meta", random_init=True)
    family = family_for(ckpt)
    assert ckpt.architecture == arch and family.text.hidden_size == hidden
    assert family.tokens_per_tile == tokens_per_tile
    # A 1000 x 700 photo: its grid of tiles plus the global image / thumbnail, one embedding each a token.
    feats = family.process_image(Image.new("RGB", (1000, 700)), {})
    assert feats.pixels.shape[0] == tiles and feats.num_embeddings == tiles * tokens_per_tile
    # Built on the meta device, the model holds the published parameter count.
    weights, draw = [], ckpt.tensor
    ckpt.tensor = lambda key, shape=None: weights.append(draw(key, shape)) or weights[-1]
    family.build_model(None, max_positions=1)
    assert sum(w.numel() for w in weights) / 1e9 == pytest.approx(billions, abs=0.01)


@pytest.mark.parametrize(
    "name,shape,billions", [("gemma-3-4b", (2560, 34, 8, 4), 4.30), ("gemma-3-12b", (3840, 48, 16, 8), 12.19)]
)
def test_gemma3_presets_are_real_sizes(tmp_path, name, shape, billions):
    ckpt = load_checkpoint(preset_checkpoint(name, tmp_path / "p"), device="meta", random_init=True)
    family = family_for(ckpt)
    t = family.text
    assert (t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads) == shape
    assert t.layer_types.count("full_attention") == t.num_layers // 6 and t.sliding_window == 1024
    assert t.tie_word_embeddings  # the lm_head is the embedding matrix (4.3B and 12.2B weights)
    assert (family.vision.image_size, family.mm_tokens, family.image_processor.size["height"]) == (896, 256, 896)
    weights, draw = [], ckpt.tensor
    ckpt.tensor = lambda key, shape=None: weights.append(draw(key, shape)) or weights[-1]
    family.build_model(None, max_positions=1)
    assert sum(w.numel() for w in weights) / 1e9 == pytest.approx(billions, abs=0.01)


def test_presets_read_the_published_files_of_the_test_corpus():
    """Every config file the package ships for the presets is byte for byte the one in tests/fixtures/real (whose
    SOURCES.md names its repository, commit and sha256)."""
    from cultengine.presets import PUBLISHED
    from real_checkpoints import FIXTURES

    shipped = sorted(p for p in PUBLISHED.rglob("*.json"))
    assert len(shipped) >= 10
    for path in shipped:
        assert path.read_bytes() == (FIXTURES / path.relative_to(PUBLISHED)).read_bytes(), path


def test_qwen3_vl_preset_has_the_published_shape(tmp_path):
    ckpt = load_checkpoint(preset_checkpoint("qwen3-vl-4b", tmp_path / "p"), device="meta", random_init=True)
    family = family_for(ckpt)
    t, v = family.text, family.vision
    assert ckpt.architecture == "Qwen3VLForConditionalGeneration"
    assert (t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads) == (2560, 36, 32, 8)
    assert (v.depth, v.patch_size) == (24, 16)


def test_each_family_declares_the_presets_of_its_own_architectures(tmp_path, capsys):
    """A preset sits in the file of the family that runs it, and `--list-presets` names every one."""
    import importlib

    from cultengine.models import FAMILIES, presets

    by_module: dict[str, set[str]] = {}
    for arch, entry in FAMILIES.items():
        by_module.setdefault(entry.rsplit(".", 1)[0], set()).add(arch)
    seen = {}
    for module, archs in by_module.items():
        for name in getattr(importlib.import_module(f"cultengine.models.{module}"), "PRESETS", {}):
            assert name not in seen, f"preset {name} declared by both {seen[name]} and {module}"
            seen[name] = module
            ckpt = load_checkpoint(preset_checkpoint(name, tmp_path / name), device="meta", random_init=True)
            assert ckpt.architecture in archs, (name, module, ckpt.architecture)
    assert list(presets()) == list(seen) and len(seen) >= 12
    assert cli.main(["profile", "--list-presets"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == list(seen)


@pytest.mark.parametrize(
    "name,arch,shape,tiles,embeddings,billions",
    [
        # 1000 x 700 smart-resized to 980 x 700 patches of 14: 70 x 50 grid, 2 frames -> 3600 patch rows, 900 tokens
        ("qwen2-vl-2b", "Qwen2VLForConditionalGeneration", (1536, 28, 12, 2), 3600, 900, 2.21),
        # longest edge to 2048, 512-px tiles: 4 x 3 + the global image, 64 tokens each
        ("smolvlm-256m", "Idefics3ForConditionalGeneration", (576, 30, 9, 3), 13, 13 * 64, 0.256),
    ],
)
def test_presets_from_the_newly_found_published_files(tmp_path, name, arch, shape, tiles, embeddings, billions):
    ckpt = load_checkpoint(preset_checkpoint(name, tmp_path / "p"), device="meta", random_init=True)
    family = family_for(ckpt)
    t = family.text
    assert ckpt.architecture == arch and (t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads) == shape
    feats = family.process_image(Image.new("RGB", (1000, 700)), {})
    assert feats.pixels.shape[0] == tiles and feats.num_embeddings == embeddings
    weights, draw = [], ckpt.tensor
    ckpt.tensor = lambda key, shape=None, part=None: weights.append(draw(key, shape, part)) or weights[-1]
    family.build_model(None, max_positions=1)
    assert sum(w.numel() for w in weights) / 1e9 == pytest.approx(billions, abs=0.005)
