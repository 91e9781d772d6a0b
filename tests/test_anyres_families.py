"""LLaVA-NeXT and LLaVA-OneVision against transformers on tiny random checkpoints (fp32, CPU).

Images of different sizes and aspect ratios pick different tile grids (and OneVision shrinks large
grids and does not tile the images of a multi-image prompt), so token counts differ per image.
"""

from __future__ import annotations

import json
import shutil

import pytest

from cultengine import Engine, SamplingParams
from cultengine.checkpoint import load_checkpoint
from cultengine.errors import CheckpointError
from cultengine.models import family_for
from family_parity import (
    assert_choice_scores_match,
    assert_generations_match,
    assert_serving_features_change_nothing,
    edited,
    image,
    reference,
    to_transformers4_config,
    user,
)
from tiny_checkpoints import ANYRES_FAMILIES, build_tiny_anyres

ATOL = 1e-4


WIDE, TALL, SMALL, ODD = image(90, 24, 1), image(22, 70, 2), image(20, 15, 3), image(37, 53, 4)


CONVERSATIONS = [
    user("Tell me about the festival of lights, señor."),
    user(WIDE, "Which country is this dish from? 日本"),
    user(TALL, "and", SMALL, ": compare the two flags."),
    user(ODD, "Where?"),
]


@pytest.fixture(scope="module", params=ANYRES_FAMILIES)
def family_path(request, tmp_path_factory):
    return build_tiny_anyres(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def pair(family_path):
    model, processor = reference(family_path)
    return Engine(family_path, dtype="float32"), model, processor


def test_token_ids_greedy_tokens_and_logprobs_match_transformers(pair):
    lengths = assert_generations_match(*pair, CONVERSATIONS)
    assert len(set(lengths)) == len(CONVERSATIONS)  # tile grids (and so token counts) differ per image


def test_choice_loglikelihoods_match_transformers(pair):
    assert_choice_scores_match(*pair, CONVERSATIONS[1:3])


def test_prefix_cache_chunked_prefill_image_budget_and_preemption_change_nothing(pair, family_path):
    assert_serving_features_change_nothing(pair[0], family_path, CONVERSATIONS)


def test_both_config_layouts_load_the_same(pair, family_path, tmp_path):
    engine = pair[0]
    old = to_transformers4_config(family_path, tmp_path / "v4")
    req, params = [{"messages": CONVERSATIONS[1]}], SamplingParams(max_tokens=5)
    assert (
        Engine(old, dtype="float32").generate(req, params, use_tqdm=False)[0].token_ids
        == engine.generate(req, params, use_tqdm=False)[0].token_ids
    )


def test_pil_path_matches_transformers_pil_processor(family_path):
    engine = Engine(family_path, dtype="float32", image_backend="pil")
    model, processor = reference(family_path, backend="pil")
    assert engine.provenance()["image_backend"] == "pil"
    assert_generations_match(engine, model, processor, CONVERSATIONS[1:2], max_tokens=5)


def test_triton_backend_gives_the_torch_tokens(pair, family_path):
    engine, _, _ = pair
    req = [{"messages": CONVERSATIONS[3]}]
    triton = Engine(family_path, dtype="float32", attention_backend="triton")
    params = SamplingParams(max_tokens=4)
    assert (
        triton.generate(req, params, use_tqdm=False)[0].token_ids
        == engine.generate(req, params, use_tqdm=False)[0].token_ids
    )


@pytest.mark.parametrize(
    "file,changes,needle",
    [
        ("config.json", {"image_grid_pinpoints": [[28, 50]]}, "not multiples of the vision tower's 28-pixel tiles"),
        ("config.json", {"image_grid_pinpoints": "big"}, "image_grid_pinpoints must be a list"),
        ("processor_config.json", {"image_grid_pinpoints": [[56, 56]]}, "differ from config.json"),
        (
            "processor_config.json",
            {"size": {"height": 30, "width": 30}, "crop_size": {"height": 30, "width": 30}},
            "vision tower takes 28x28",
        ),
    ],
)
def test_inconsistent_checkpoints_name_file_and_field(family_path, tmp_path, file, changes, needle):
    with pytest.raises(CheckpointError, match=needle) as err:
        family_for(load_checkpoint(edited(family_path, tmp_path / "bad", file, **changes)))
    assert file in str(err.value)


def test_missing_processor_file_is_a_checkpoint_error(family_path, tmp_path):
    d = shutil.copytree(family_path, tmp_path / "noproc")
    (d / "processor_config.json").unlink()
    with pytest.raises(CheckpointError, match="preprocessor_config.json.*not found"):
        family_for(load_checkpoint(d))


def test_unsupported_architecture_lists_the_registry(family_path, tmp_path):
    d = edited(family_path, tmp_path / "bad", "config.json", architectures=["FancyVLMForConditionalGeneration"])
    with pytest.raises(
        CheckpointError,
        match="'FancyVLM.*supported: LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, LlavaOnevision",
    ):
        family_for(load_checkpoint(d))


def test_bench_runs_on_the_family(family_path, tmp_path):
    """`cultengine bench --model DIR` on the embedded default benchmark (its first rows)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    env = dict(os.environ, CULTENGINE_CACHE=str(tmp_path / "cache"))
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "cultengine.cli",
            "bench",
            "--device",
            "cpu",
            "--model",
            str(family_path),
            "--limit",
            "6",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["n"] == 6 and len((out / "results.jsonl").read_text().splitlines()) == 6
