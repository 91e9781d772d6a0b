"""LLaVA-NeXT and LLaVA-OneVision against transformers on tiny random checkpoints (fp32, CPU).

Images of different sizes and aspect ratios pick different tile grids (and OneVision shrinks large
grids and does not tile the images of a multi-image prompt), so token counts differ per image.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from cultengine import Engine, SamplingParams
from cultengine.checkpoint import load_checkpoint
from cultengine.errors import CheckpointError
from cultengine.models import family_for
from family_parity import chat_inputs, extras, image, logprobs, user
from tiny_checkpoints import ANYRES_FAMILIES, build_tiny_anyres, reference_anyres

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
    model, processor = reference_anyres(family_path)
    return Engine(family_path, dtype="float32"), model, processor


def test_token_ids_greedy_tokens_and_logprobs_match_transformers(pair):
    engine, model, processor = pair
    outs = engine.generate([{"messages": m} for m in CONVERSATIONS], SamplingParams(max_tokens=8), use_tqdm=False)
    counts = set()
    for messages, out in zip(CONVERSATIONS, outs, strict=True):
        inputs = chat_inputs(processor, messages)
        ids = inputs["input_ids"][0].tolist()
        assert out.error is None, out.error
        assert out.prompt_token_ids == ids
        counts.add(len(ids))
        with torch.no_grad():
            want = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
        assert out.token_ids == want
        lp = logprobs(model, ids + want, extras(inputs))
        expected = lp[len(ids) - 1:-1].gather(1, torch.tensor(want)[:, None]).squeeze(1)
        np.testing.assert_allclose(out.logprobs, expected.numpy(), atol=ATOL)
    assert len(counts) == len(CONVERSATIONS)  # tile grids (and so token counts) differ per image


def test_choice_loglikelihoods_match_transformers(pair):
    engine, model, processor = pair
    choices = ["Japan", " Peru", "Ghana and more"]
    scores = engine.score([{"messages": m, "choices": choices} for m in CONVERSATIONS[1:3]], use_tqdm=False)
    for messages, score in zip(CONVERSATIONS[1:3], scores, strict=True):
        assert score.error is None, score.error
        inputs = chat_inputs(processor, messages)
        ctx = inputs["input_ids"][0].tolist()
        for choice, got in zip(choices, score.choices, strict=True):
            cont = processor.tokenizer(choice, add_special_tokens=False)["input_ids"]
            lp = logprobs(model, ctx + cont, extras(inputs))[len(ctx) - 1:-1]
            assert got.num_tokens == len(cont)
            assert got.logprob == pytest.approx(float(lp.gather(1, torch.tensor(cont)[:, None]).sum()), abs=ATOL)


def test_prefix_cache_chunked_prefill_image_budget_and_preemption_change_nothing(pair, family_path):
    engine, _, _ = pair
    reqs = [{"messages": m} for m in CONVERSATIONS] * 2
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True)
    outs = engine.generate(reqs, params, use_tqdm=False)
    expected = [o.token_ids for o in outs]
    assert engine.stats()["prefix_cache_hit_tokens"] > 0  # the repeated conversations share their context
    longest = max(len(o.prompt_token_ids) for o in outs) + 6
    # A few KV blocks more than the longest sequence needs: sequences are preempted and recomputed.
    tight = [{"block_size": 4, "num_blocks": -(-longest // 4) + extra, "max_model_len": longest}
             for extra in (8, 24, 32)]
    preemptions = 0
    for kwargs in ({"enable_prefix_caching": False}, {"max_num_batched_tokens": 16, "block_size": 4},
                   {"max_num_image_tokens": 1}, *tight):
        other = Engine(family_path, dtype="float32", **kwargs)
        assert [o.token_ids for o in other.generate(reqs, params, use_tqdm=False)] == expected, kwargs
        preemptions += other.stats()["num_preemptions"]
    assert preemptions > 0
    # Scoring shares each context across its choices as for LLaVA-1.5.
    before = engine.stats()["prefix_cache_hit_tokens"]
    engine.score([{"messages": CONVERSATIONS[1], "choices": ["a", "b", "c", "d"]}], use_tqdm=False)
    assert engine.stats()["prefix_cache_hit_tokens"] - before >= 3 * 16


def test_both_config_layouts_load_the_same(pair, family_path, tmp_path):
    engine, _, _ = pair
    old = shutil.copytree(family_path, tmp_path / "v4")
    config = json.loads((old / "config.json").read_text())
    text = config["text_config"]
    # transformers 4 wrote torch_dtype and rope_theta (+ rope_scaling); transformers 5 dtype and rope_parameters.
    assert "rope_parameters" in text or "rope_theta" in text
    params = text.pop("rope_parameters", None) or {"rope_theta": text.pop("rope_theta")}
    text["rope_theta"], text["rope_scaling"] = params["rope_theta"], None
    for c in (config, text, config["vision_config"]):
        if "dtype" in c:
            c["torch_dtype"] = c.pop("dtype")
    (old / "config.json").write_text(json.dumps(config))
    req = [{"messages": CONVERSATIONS[1]}]
    assert (Engine(old, dtype="float32").generate(req, SamplingParams(max_tokens=5), use_tqdm=False)[0].token_ids
            == engine.generate(req, SamplingParams(max_tokens=5), use_tqdm=False)[0].token_ids)


def test_pil_path_matches_transformers_pil_processor(family_path):
    engine = Engine(family_path, dtype="float32", image_backend="pil")
    model, processor = reference_anyres(family_path, backend="pil")
    inputs = chat_inputs(processor, CONVERSATIONS[1])
    ids = inputs["input_ids"][0].tolist()
    out = engine.generate([{"messages": CONVERSATIONS[1]}], SamplingParams(max_tokens=5), use_tqdm=False)[0]
    assert engine.provenance()["image_backend"] == "pil" and out.prompt_token_ids == ids
    lp = logprobs(model, ids + out.token_ids, extras(inputs))
    expected = lp[len(ids) - 1:-1].gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
    np.testing.assert_allclose(out.logprobs, expected.numpy(), atol=ATOL)


def test_triton_backend_gives_the_torch_tokens(pair, family_path):
    engine, _, _ = pair
    req = [{"messages": CONVERSATIONS[3]}]
    triton = Engine(family_path, dtype="float32", attention_backend="triton")
    params = SamplingParams(max_tokens=4)
    assert (triton.generate(req, params, use_tqdm=False)[0].token_ids
            == engine.generate(req, params, use_tqdm=False)[0].token_ids)


def _edited(src, tmp_path, file: str, **changes):
    d = shutil.copytree(src, tmp_path / "bad")
    data = json.loads((d / file).read_text())
    target = data.get("image_processor", data) if file == "processor_config.json" else data
    target.update(changes)
    (d / file).write_text(json.dumps(data))
    return d


@pytest.mark.parametrize("file,changes,needle", [
    ("config.json", {"image_grid_pinpoints": [[28, 50]]}, "not multiples of the vision tower's 28-pixel tiles"),
    ("config.json", {"image_grid_pinpoints": "big"}, "image_grid_pinpoints must be a list"),
    ("processor_config.json", {"image_grid_pinpoints": [[56, 56]]}, "differ from config.json"),
    ("processor_config.json", {"size": {"height": 30, "width": 30}, "crop_size": {"height": 30, "width": 30}},
     "vision tower takes 28x28"),
])
def test_inconsistent_checkpoints_name_file_and_field(family_path, tmp_path, file, changes, needle):
    with pytest.raises(CheckpointError, match=needle) as err:
        family_for(load_checkpoint(_edited(family_path, tmp_path, file, **changes)))
    assert file in str(err.value)


def test_missing_processor_file_is_a_checkpoint_error(family_path, tmp_path):
    d = shutil.copytree(family_path, tmp_path / "noproc")
    (d / "processor_config.json").unlink()
    with pytest.raises(CheckpointError, match="preprocessor_config.json.*not found"):
        family_for(load_checkpoint(d))


def test_unsupported_architecture_lists_the_registry(family_path, tmp_path):
    d = _edited(family_path, tmp_path, "config.json", architectures=["FancyVLMForConditionalGeneration"])
    with pytest.raises(CheckpointError, match="'FancyVLM.*supported: LlavaForConditionalGeneration, "
                                              "LlavaNextForConditionalGeneration, LlavaOnevision"):
        family_for(load_checkpoint(d))


def test_bench_runs_on_the_family(family_path, tmp_path):
    """`cultengine bench --model DIR` on the embedded default benchmark (its first rows)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    env = dict(os.environ, CULTENGINE_CACHE=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "-m", "cultengine.cli", "bench", "--device", "cpu", "--model",
                        str(family_path), "--limit", "6", "--output-dir", str(out)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["n"] == 6 and len((out / "results.jsonl").read_text().splitlines()) == 6
