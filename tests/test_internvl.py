"""InternVL (transformers-native layout) against transformers on tiny random checkpoints (fp32, CPU).

The test images pick different grids of 28-px tiles by aspect ratio: one tile (a square image, no
thumbnail), several (4 x 1, 1 x 3, each with a thumbnail) and the maximum of 6 (3 x 2, 2 x 3).
Two towers: InternVL3's (LayerNorm, mean pooling) and one with RMSNorm, q/k norms and q/k/v biases;
and InternVL3.5's layout, InternVL3's tower before a Qwen3 decoder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cultengine import Engine, SamplingParams
from cultengine.checkpoint import load_checkpoint
from cultengine.errors import CheckpointError
from cultengine.models import family_for
from family_parity import (
    ATOL,
    CONVERSATIONS,
    ODD,
    SMALL,
    SQUARE,
    TALL,
    WIDE,
    assert_choice_scores_match,
    assert_cuda_matches_cpu,
    assert_generations_match,
    assert_serving_features_change_nothing,
    edited,
    reference,
    to_transformers4_config,
)
from tiny_tiles import build_tiny_tiles


@pytest.fixture(scope="module", params=["internvl", "internvl_qk", "internvl_qwen3"])
def family_path(request, tmp_path_factory):
    return build_tiny_tiles(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def pair(family_path):
    model, processor = reference(family_path)
    return Engine(family_path, dtype="float32"), model, processor


def test_token_ids_greedy_tokens_and_logprobs_match_transformers(pair):
    lengths = assert_generations_match(*pair, CONVERSATIONS)
    assert len(set(lengths[1:])) == len(lengths) - 1  # the one-image prompts' tile counts differ


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_tiles_and_pixels_match_the_processor(family_path, backend):
    family = family_for(load_checkpoint(family_path), backend)
    _, processor = reference(family_path, backend)
    counts = {}
    for im in (WIDE, TALL, SMALL, ODD, SQUARE):
        feats = family.process_image(im, {})
        ref = processor.image_processor(images=[im], crop_to_patches=True, return_tensors="pt")
        assert torch.equal(feats.pixels, ref["pixel_values"])  # exact, on the processor's own path
        n = int(ref["num_patches"][0])
        assert feats.embedding_runs == [(1, 4 * n)] and len(feats.token_ids) == 4 * n + 2  # <img> ... </img>
        counts[im.size] = n
    assert counts[SQUARE.size] == 1  # one tile, no thumbnail
    assert counts[WIDE.size] == 4 + 1 and counts[TALL.size] == 3 + 1  # several tiles and the thumbnail
    assert counts[SMALL.size] == counts[ODD.size] == 6 + 1  # max_patches tiles and the thumbnail


def test_choice_loglikelihoods_match_transformers(pair):
    assert_choice_scores_match(*pair, CONVERSATIONS[1:3])


def test_prefix_cache_chunked_prefill_image_budget_and_preemption_change_nothing(pair, family_path):
    assert_serving_features_change_nothing(pair[0], family_path, CONVERSATIONS)


def test_pil_path_matches_transformers_pil_processor(family_path):
    engine = Engine(family_path, dtype="float32", image_backend="pil")
    model, processor = reference(family_path, backend="pil")
    assert engine.provenance()["image_backend"] == "pil"
    assert_generations_match(engine, model, processor, CONVERSATIONS[2:4], max_tokens=5)


def test_both_config_layouts_load_the_same(pair, family_path, tmp_path):
    engine = pair[0]
    old = to_transformers4_config(family_path, tmp_path / "v4")
    req, params = [{"messages": CONVERSATIONS[1]}], SamplingParams(max_tokens=5)
    assert (
        Engine(old, dtype="float32").generate(req, params, use_tqdm=False)[0].token_ids
        == engine.generate(req, params, use_tqdm=False)[0].token_ids
    )


def test_triton_backend_matches_the_torch_path(pair, family_path):
    # The Triton patch embedding adds InternViT's projection bias to patch rows only, not the class token's.
    req, params = [{"messages": CONVERSATIONS[1]}], SamplingParams(max_tokens=4)
    triton = Engine(family_path, dtype="float32", attention_backend="triton").generate(req, params, use_tqdm=False)
    torch_path = pair[0].generate(req, params, use_tqdm=False)
    assert triton[0].token_ids == torch_path[0].token_ids
    np.testing.assert_allclose(triton[0].logprobs, torch_path[0].logprobs, atol=ATOL)


@pytest.mark.parametrize(
    "file,changes,needle",
    [
        ("processor_config.json", {"size": {"height": 32, "width": 32}}, r"size \(32, 32\) is not the vision tower's"),
        ("processor_config.json", {"image_seq_length": 9}, "image_seq_length 9 is not the"),
        ("processor_config.json", {"max_patches": 0}, "are not 1 <= min <= max"),
        ("config.json", {"downsample_ratio": 0.3}, "downsample_ratio 0.3 must be 1/n"),
        ("config.json", {"vision_feature_select_strategy": "full"}, "is not 'default'"),
    ],
)
def test_inconsistent_checkpoints_name_file_and_field(family_path, tmp_path, file, changes, needle):
    with pytest.raises(CheckpointError, match=needle) as err:
        family_for(load_checkpoint(edited(family_path, tmp_path / "bad", file, **changes)))
    assert f"/{file}" in str(err.value)


def test_remote_code_layout_names_the_hf_checkpoint(family_path, tmp_path):
    # OpenGVLab's original upload: InternVLChatModel with its own modelling code, loaded via auto_map.
    path = edited(
        family_path,
        tmp_path / "remote",
        "config.json",
        architectures=["InternVLChatModel"],
        auto_map={"AutoModel": "modeling_internvl_chat.InternVLChatModel"},
    )
    config = json.loads((path / "config.json").read_text())
    assert config["auto_map"]
    needle = "-hf.*InternVLForConditionalGeneration.*never runs checkpoint code"
    with pytest.raises(CheckpointError, match=needle):  # refused before a weight file is opened
        Engine(path, dtype="float32")
    with pytest.raises(CheckpointError, match=needle):  # and by the registry
        family_for(load_checkpoint(path))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_the_cpu_torch_path(family_path):
    assert_cuda_matches_cpu(family_path, CONVERSATIONS)
