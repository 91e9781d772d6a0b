"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL against transformers on tiny random checkpoints (fp32, CPU).

Images of different sizes and aspect ratios (a wide and a tall one, one under `min_pixels` that the
processor enlarges, one over `max_pixels` that it shrinks) give different patch grids, so token counts
and M-RoPE positions differ per image; Qwen2.5-VL's windows (2x2 merged patches) split every test image
but the smallest, and its block 1 attends over whole images.
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
from cultengine.models.qwen2_5_vl import window_layout
from cultengine.models.qwen2_vl import mrope_positions
from family_parity import assert_rotary_fusion_changes_nothing, image, reference, user
from tiny_qwen import QWEN_FAMILIES, build_tiny_qwen

ATOL = 1e-4


WIDE, TALL, LARGE, SMALL = image(150, 40, 1), image(40, 130, 2), image(200, 160, 3), image(10, 12, 4)


CONVERSATIONS = [
    user("Tell me about the festival of lights, señor."),
    user(WIDE, "Which country is this dish from? 日本"),
    user(TALL, "and", LARGE, ": compare the two flags."),
    user(SMALL, "Where?"),
]


@pytest.fixture(scope="module", params=QWEN_FAMILIES)
def family_path(request, tmp_path_factory):
    return build_tiny_qwen(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def pair(family_path):
    model, processor = reference(family_path)
    return Engine(family_path, dtype="float32"), model, processor


def _inputs(processor, messages) -> dict:
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


@torch.no_grad()
def _logprobs(model, inputs: dict, continuation: list[int]) -> torch.Tensor:
    """Log-probabilities of every position of the prompt followed by `continuation` (text tokens)."""
    ids = torch.cat([inputs["input_ids"], torch.tensor([continuation], dtype=torch.long)], dim=1)
    extras = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    extras["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, len(continuation)))
    return torch.log_softmax(model(input_ids=ids, **extras).logits[0].float(), dim=-1)


def _check_generation(model, inputs: dict, out, max_tokens: int) -> None:
    ids = inputs["input_ids"][0].tolist()
    assert out.error is None, out.error
    assert out.prompt_token_ids == ids
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)[0, len(ids) :].tolist()
    assert out.token_ids == want
    lp = _logprobs(model, inputs, want)[len(ids) - 1 : -1]
    np.testing.assert_allclose(out.logprobs, lp.gather(1, torch.tensor(want)[:, None]).squeeze(1).numpy(), atol=ATOL)


def test_token_ids_greedy_tokens_and_logprobs_match_transformers(pair):
    engine, model, processor = pair
    outs = engine.generate([{"messages": m} for m in CONVERSATIONS], SamplingParams(max_tokens=8), use_tqdm=False)
    counts = set()
    for messages, out in zip(CONVERSATIONS, outs, strict=True):
        inputs = _inputs(processor, messages)
        _check_generation(model, inputs, out, 8)
        counts.add(len(out.prompt_token_ids))
    assert len(counts) == len(CONVERSATIONS)  # patch grids (and so token counts) differ per image


def test_mrope_positions_equal_get_rope_index(pair):
    """The family's positions for the engine's own token ids and processed images (and `mrope_positions`
    for a grid whose images sit back to back) equal transformers' `get_rope_index`; decode offsets too."""
    engine, model, processor = pair
    family, image_token = engine.family, engine.family.placeholder_id
    for messages in CONVERSATIONS:
        inputs = _inputs(processor, messages)
        ids = inputs["input_ids"][0].tolist()
        starts = [i for i, t in enumerate(ids) if t == image_token and (i == 0 or ids[i - 1] != image_token)]
        images = [item["image"] for item in messages[0]["content"] if item["type"] == "image"]
        got, delta = family.positions(
            ids, [(s, family.process_image(im, {})) for s, im in zip(starts, images, strict=True)]
        )
        grids = inputs.get("image_grid_thw")
        if grids is None:
            want, want_delta = torch.arange(len(ids)).expand(3, 1, -1), torch.zeros(1, 1, dtype=torch.long)
        else:
            want, want_delta = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], grids)
        np.testing.assert_array_equal(got, want[:, 0].numpy())
        assert delta == int(want_delta)
    # Two images with no text between them (a raw prompt can do that): each keeps its own grid.
    grids = torch.tensor([[1, 4, 6], [1, 8, 2]])
    n = [int(g.prod()) // 4 for g in grids]
    ids = torch.tensor([[7] * 3 + [image_token] * sum(n) + [7] * 2])
    types = (ids == image_token).int()
    got, delta = mrope_positions(ids.shape[1], [(3, (1, 4, 6)), (3 + n[0], (1, 8, 2))], family.vision.merge_size)
    first, _ = model.model.get_rope_index(ids[:, : 3 + n[0]], types[:, : 3 + n[0]], grids[:1])
    np.testing.assert_array_equal(got[:, : 3 + n[0]], first[:, 0].numpy())
    assert got[:, 3 + n[0] :].min() == got[:, : 3 + n[0]].max() + 1  # the second image starts after the first


def test_choice_loglikelihoods_match_transformers(pair):
    engine, model, processor = pair
    choices = ["Japan", " Peru", "Ghana and more"]
    scores = engine.score([{"messages": m, "choices": choices} for m in CONVERSATIONS[1:3]], use_tqdm=False)
    for messages, score in zip(CONVERSATIONS[1:3], scores, strict=True):
        assert score.error is None, score.error
        inputs = _inputs(processor, messages)
        n = inputs["input_ids"].shape[1]
        for choice, got in zip(choices, score.choices, strict=True):
            cont = processor.tokenizer(choice, add_special_tokens=False)["input_ids"]
            lp = _logprobs(model, inputs, cont)[n - 1 : -1]
            assert got.num_tokens == len(cont)
            assert got.logprob == pytest.approx(float(lp.gather(1, torch.tensor(cont)[:, None]).sum()), abs=ATOL)


def test_prefix_cache_chunked_prefill_image_budget_and_preemption_change_nothing(pair, family_path):
    engine, _, _ = pair
    # The second pair of requests shares the first's images (and WIDE's whole context).
    reqs = [{"messages": m} for m in CONVERSATIONS] * 2 + [{"messages": user(WIDE, "A different question?")}]
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True)
    outs = engine.generate(reqs, params, use_tqdm=False)
    expected = [o.token_ids for o in outs]
    assert engine.stats()["prefix_cache_hit_tokens"] > 0
    image_token = engine.family.placeholder_id
    assert max(o.prompt_token_ids.count(image_token) for o in outs) > 16  # so 16-token chunks split an image
    longest = max(len(o.prompt_token_ids) for o in outs) + 6
    # A few KV blocks more than the longest sequence needs: sequences are preempted and recomputed.
    tight = [
        {"block_size": 4, "num_blocks": -(-longest // 4) + extra, "max_model_len": longest} for extra in (0, 4, 16)
    ]
    preemptions = 0
    for kwargs in (
        {"enable_prefix_caching": False},
        {"max_num_batched_tokens": 16, "block_size": 4},
        {"max_num_image_tokens": 1},
        *tight,
    ):
        other = Engine(family_path, dtype="float32", **kwargs)
        assert [o.token_ids for o in other.generate(reqs, params, use_tqdm=False)] == expected, kwargs
        preemptions += other.stats()["num_preemptions"]
    assert preemptions > 0
    before = engine.stats()["prefix_cache_hit_tokens"]
    engine.score([{"messages": CONVERSATIONS[1], "choices": ["a", "b", "c", "d"]}], use_tqdm=False)
    assert engine.stats()["prefix_cache_hit_tokens"] - before >= 3 * 16


@pytest.mark.parametrize("backend", ["pil", "torchvision"])
def test_both_image_paths_match_transformers_processors(family_path, backend):
    engine = Engine(family_path, dtype="float32", image_backend=backend)
    model, processor = reference(family_path, backend=backend)
    for img in (WIDE, TALL, LARGE, SMALL):
        want = processor.image_processor(images=[img], return_tensors="pt")
        feats = engine.family.process_image(img, {})
        assert feats.meta.thw == tuple(want["image_grid_thw"][0].tolist())
        torch.testing.assert_close(feats.pixels, want["pixel_values"], atol=1e-6, rtol=0)
    messages = CONVERSATIONS[2]
    out = engine.generate([{"messages": messages}], SamplingParams(max_tokens=5), use_tqdm=False)[0]
    assert engine.provenance()["image_backend"] == backend
    _check_generation(model, _inputs(processor, messages), out, 5)


def test_min_and_max_pixels_per_request_and_per_engine(pair, family_path):
    engine, model, processor = pair
    factor = engine.family.image_processor.factor
    low, high = 4 * factor * factor, 8 * factor * factor
    text = processor.apply_chat_template(CONVERSATIONS[2], add_generation_prompt=True, tokenize=False)
    inputs = processor(
        text=[text], images=[TALL, LARGE], size={"shortest_edge": low, "longest_edge": high}, return_tensors="pt"
    )
    grids = inputs["image_grid_thw"]
    assert grids.prod(-1).tolist() != _inputs(processor, CONVERSATIONS[2])["image_grid_thw"].prod(-1).tolist()
    out = engine.generate(
        [{"messages": CONVERSATIONS[2], "min_pixels": low, "max_pixels": high}],
        SamplingParams(max_tokens=5),
        use_tqdm=False,
    )[0]
    _check_generation(model, inputs, out, 5)
    per_engine = Engine(family_path, dtype="float32", image_options={"min_pixels": low, "max_pixels": high})
    again = per_engine.generate([{"messages": CONVERSATIONS[2]}], SamplingParams(max_tokens=5), use_tqdm=False)[0]
    assert again.prompt_token_ids == out.prompt_token_ids and again.token_ids == out.token_ids
    with pytest.raises(ValueError, match="not read by this model family"):
        Engine(family_path, dtype="float32", image_options={"num_tiles": 3})
    bad = engine.generate([{"messages": CONVERSATIONS[1], "max_pixels": "big"}], use_tqdm=False)[0]
    assert "max_pixels" in bad.error


def test_raw_prompts_and_a_video_request_get_a_clear_error(pair):
    engine, model, processor = pair
    video = [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}, {"type": "text", "text": "Hi"}]}]
    prompt = (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Which country?<|im_end|>\n<|im_start|>assistant\n"
    )
    outs = engine.generate(
        [{"messages": video}, {"prompt": prompt, "images": [WIDE]}], SamplingParams(max_tokens=4), use_tqdm=False
    )
    assert outs[0].error and "video" in outs[0].error
    inputs = processor(text=[prompt], images=[WIDE], return_tensors="pt")
    _check_generation(model, inputs, outs[1], 4)
    scored = engine.score([{"messages": video, "choices": ["a"]}], use_tqdm=False)[0]
    assert scored.error and "video" in scored.error
    # The processors refuse aspect ratios over 200: that image's request fails alone.
    outs = engine.generate(
        [{"messages": user(image(402, 2, 5), "?")}, {"messages": CONVERSATIONS[0]}],
        SamplingParams(max_tokens=2),
        use_tqdm=False,
    )
    assert "aspect ratio" in outs[0].error and outs[1].error is None


def test_window_attention_splits_the_test_images(family_path):
    family = family_for(load_checkpoint(family_path))
    if not hasattr(family.vision, "window_size"):
        pytest.skip("only Qwen2.5-VL has window attention")
    v = family.vision
    for img in (WIDE, TALL, LARGE):
        grid = family.process_image(img, {}).meta.thw
        _, windows = window_layout([grid], v.merge_size, v.window_size // (v.merge_size * v.patch_size))
        assert len(windows) > 1 and sum(windows) == grid[1] * grid[2]
    assert 0 < len(v.fullatt_block_indexes) < v.depth


def test_fused_rotary_write_kv_changes_no_output(family_path):
    """M-RoPE's per-token tables, images of two grids in one prompt: fusion on and off agree bit for bit."""
    assert_rotary_fusion_changes_nothing(family_path, [{"messages": m} for m in CONVERSATIONS[1:3]])


def test_triton_backend_gives_the_torch_tokens(pair, family_path):
    engine, _, _ = pair
    req = [{"messages": CONVERSATIONS[2]}]
    triton = Engine(family_path, dtype="float32", attention_backend="triton")
    params = SamplingParams(max_tokens=3)
    assert (
        triton.generate(req, params, use_tqdm=False)[0].token_ids
        == engine.generate(req, params, use_tqdm=False)[0].token_ids
    )


def _transformers4_layout(src, dst):
    """The checkpoint as transformers 4 wrote it: a flat config (decoder fields at the top level, M-RoPE in
    `rope_scaling`, `torch_dtype`) and `model.layers.*` / `visual.*` weight names."""
    from safetensors.torch import load_file, save_file

    d = shutil.copytree(src, dst)
    config = json.loads((d / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    text.update(rope_theta=rope.pop("rope_theta"), rope_scaling={"type": "mrope", **rope})
    text.pop("rope_type", None)
    text.pop("model_type")
    config.update(text, torch_dtype=config.pop("dtype"))
    (d / "config.json").write_text(json.dumps(config))
    renames = (("model.language_model.", "model."), ("model.visual.", "visual."))
    tensors = load_file(d / "model.safetensors")
    renamed = {}
    for name, t in tensors.items():
        for old, new in renames:
            if name.startswith(old):
                name = new + name[len(old) :]
        renamed[name] = t
    save_file(renamed, d / "model.safetensors", metadata={"format": "pt"})
    return d


def test_transformers4_config_and_weight_layout_load_the_same(pair, family_path, tmp_path):
    engine, _, _ = pair
    old = _transformers4_layout(family_path, tmp_path / "v4")
    req = [{"messages": CONVERSATIONS[1]}]
    assert (
        Engine(old, dtype="float32").generate(req, SamplingParams(max_tokens=5), use_tqdm=False)[0].token_ids
        == engine.generate(req, SamplingParams(max_tokens=5), use_tqdm=False)[0].token_ids
    )


def _edited(src, tmp_path, file: str, change):
    d = shutil.copytree(src, tmp_path / "bad")
    data = json.loads((d / file).read_text())
    change(data.get("image_processor", data) if file == "processor_config.json" else data)
    (d / file).write_text(json.dumps(data))
    return d


@pytest.mark.parametrize(
    "file,change,needle",
    [
        ("config.json", lambda c: c["text_config"]["rope_parameters"].update(mrope_section=[2, 2, 2]), "mrope_section"),
        ("processor_config.json", lambda c: c.update(patch_size=7), "patch_size 7 differs"),
        ("processor_config.json", lambda c: c.update(size={"shortest_edge": 0, "longest_edge": 100}), "min_pixels"),
        ("config.json", lambda c: c["vision_config"].update(num_heads=3), "num_heads"),
    ],
)
def test_inconsistent_checkpoints_name_file_and_field(family_path, tmp_path, file, change, needle):
    with pytest.raises(CheckpointError, match=needle) as err:
        family_for(load_checkpoint(_edited(family_path, tmp_path, file, change)))
    assert file in str(err.value)


def test_qwen25_vl_presets_have_real_shapes_and_plan_memory(tmp_path, capsys):
    from cultengine import cli
    from cultengine.profile import preset_checkpoint

    ckpt = load_checkpoint(preset_checkpoint("qwen2.5-vl-7b", tmp_path / "p"), device="meta", random_init=True)
    family = family_for(ckpt)
    assert str(ckpt.dtype) == "torch.bfloat16" and ckpt.architecture == "Qwen2_5_VLForConditionalGeneration"
    assert (family.text.hidden_size, family.text.num_layers, family.text.num_kv_heads) == (3584, 28, 4)
    assert (family.vision.depth, family.vision.window_size, family.vision.fullatt_block_indexes) == (
        32,
        112,
        (7, 15, 23, 31),
    )
    assert cli.main(["profile", "--model", "qwen2.5-vl-7b", "--dry-run", "--json"]) == 0
    small = json.loads(capsys.readouterr().out)
    assert cli.main(["profile", "--model", "qwen2.5-vl-72b", "--dry-run", "--json", "--max-model-len", "32768"]) == 0
    large = json.loads(capsys.readouterr().out)
    assert 15 < small["weight_gib"] < 16 and small["fits_one_gpu"]  # 8.3B parameters in bf16
    assert 130 < large["weight_gib"] < 140 and not large["fits_one_gpu"]  # 73.4B: tensor parallelism needed
    assert large["kv_bytes_per_token"] == 2 * 80 * 8 * 128 * 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_the_cpu_torch_path_and_bf16_stays_close(pair, family_path):
    """On CUDA (Triton kernels, varlen vision attention, CUDA-graph decode with 3-row positions), fp32 tokens
    and log-probabilities equal the CPU torch path's; bf16 choice log-likelihoods stay within 0.05 per token."""
    cpu_engine, _, _ = pair
    reqs = [{"messages": m} for m in CONVERSATIONS]
    params = SamplingParams(max_tokens=8)
    cpu = cpu_engine.generate(reqs, params, use_tqdm=False)
    engine = Engine(family_path, device="cuda", dtype="float32")
    cuda = engine.generate(reqs, params, use_tqdm=False)
    assert engine.ops.backend == "triton" and engine.runner.decode_graphs is not None
    assert engine.runner.decode_graphs.replays > 0
    for got, want in zip(cuda, cpu, strict=True):
        assert got.error is None and got.token_ids == want.token_ids
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)
    scored = [{**r, "choices": ["Japan", " Peru"]} for r in reqs[1:3]]
    fp32 = engine.score(scored, use_tqdm=False)
    bf16 = Engine(family_path, device="cuda", dtype="bfloat16").score(scored, use_tqdm=False)
    for a, b in zip(fp32, bf16, strict=True):
        assert a.error is None and b.error is None
        for ca, cb in zip(a.choices, b.choices, strict=True):
            assert abs(ca.logprob - cb.logprob) <= 0.05 * ca.num_tokens
