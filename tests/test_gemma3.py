"""Gemma 3 against transformers on tiny random checkpoints (fp32, CPU).

The decoder mixes sliding-window layers (window 6, shorter than every prompt here and than an image's
9 soft tokens) with full-attention ones; image tokens attend to their whole image in prefill. Parity
covers chat-form requests with 0, 1 and 2 images (system turn folded into the first user turn), chunked
prefill whose budget cuts through an image (the image moves whole to the next step), prefix caching,
the Triton kernels, both processor paths, pan-and-scan crops and both config.json layouts.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from cultengine import Engine, SamplingParams
from cultengine.checkpoint import load_checkpoint
from cultengine.errors import CheckpointError
from cultengine.models import family_for
from family_parity import assert_rotary_fusion_changes_nothing, image
from tiny_gemma import GEMMA_WINDOW, MM_TOKENS, PAN_AND_SCAN, build_tiny_gemma3, build_tiny_gemma3_text

ATOL = 1e-4


WIDE, TALL, SQUARE = image(90, 30, 1), image(22, 70, 2), image(40, 40, 3)


def _chat(*items, system: str | None = None) -> list[dict]:
    content = [
        {"type": "image", "image": x} if isinstance(x, Image.Image) else {"type": "text", "text": x} for x in items
    ]
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]


CONVERSATIONS = [
    _chat("Tell me about the festival of lights, señor.", system="Answer briefly."),
    _chat(WIDE, "Which country is this dish from? 日本"),
    _chat(TALL, "and", SQUARE, ": compare the two flags.", system="You are a careful judge."),
]


@pytest.fixture(scope="module")
def gemma_path(tmp_path_factory):
    return build_tiny_gemma3(tmp_path_factory.mktemp("gemma3"))


@pytest.fixture(scope="module")
def reference(gemma_path):
    model = transformers.Gemma3ForConditionalGeneration.from_pretrained(
        gemma_path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return model, transformers.AutoProcessor.from_pretrained(gemma_path)


@pytest.fixture(scope="module")
def engine(gemma_path):
    return Engine(gemma_path, dtype="float32")


def _inputs(processor, messages, **processor_kwargs) -> dict:
    return processor.apply_chat_template(
        messages,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs=processor_kwargs,
    )


@torch.no_grad()
def _logprobs(model, ids: list[int], inputs: dict) -> torch.Tensor:
    extras = {k: v for k, v in inputs.items() if k == "pixel_values"}
    # token_type_ids marks the image tokens (the bidirectional mask), over prompt and continuation alike.
    types = torch.tensor([[int(t == model.config.image_token_id) for t in ids]])
    logits = model(input_ids=torch.tensor([ids]), token_type_ids=types, **extras).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def _check_generation(model, processor, messages, out, max_tokens: int, **processor_kwargs) -> None:
    inputs = _inputs(processor, messages, **processor_kwargs)
    ids = inputs["input_ids"][0].tolist()
    assert out.error is None, out.error
    assert out.prompt_token_ids == ids
    assert len(ids) > GEMMA_WINDOW
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)[0, len(ids) :].tolist()
    assert out.token_ids == want
    lp = _logprobs(model, ids + want, inputs)
    expected = lp[len(ids) - 1 : -1].gather(1, torch.tensor(want)[:, None]).squeeze(1)
    np.testing.assert_allclose(out.logprobs, expected.numpy(), atol=ATOL)


def test_token_ids_greedy_tokens_and_logprobs_match_transformers(engine, reference):
    model, processor = reference
    outs = engine.generate([{"messages": m} for m in CONVERSATIONS], SamplingParams(max_tokens=8), use_tqdm=False)
    for messages, out in zip(CONVERSATIONS, outs, strict=True):
        _check_generation(model, processor, messages, out, 8)
    # The system turn is folded into the first user turn, as Gemma's template does.
    assert "Answer briefly.\n\nTell me" in engine.tokenizer.decode(outs[0].prompt_token_ids, False)


def test_prompt_logprobs_of_image_tokens_see_their_whole_image(engine, reference):
    """Choice scores over a context holding two images: every context token's attention (bidirectional
    inside each image, windowed on sliding layers) feeds the choices' log-likelihoods."""
    model, processor = reference
    choices = ["Japan", " Peru and Ghana", "no"]
    scores = engine.score([{"messages": m, "choices": choices} for m in CONVERSATIONS[1:]], use_tqdm=False)
    for messages, score in zip(CONVERSATIONS[1:], scores, strict=True):
        assert score.error is None, score.error
        inputs = _inputs(processor, messages)
        ctx = inputs["input_ids"][0].tolist()
        for choice, got in zip(choices, score.choices, strict=True):
            cont = processor.tokenizer(choice, add_special_tokens=False)["input_ids"]
            lp = _logprobs(model, ctx + cont, inputs)[len(ctx) - 1 : -1]
            assert got.num_tokens == len(cont)
            assert got.logprob == pytest.approx(float(lp.gather(1, torch.tensor(cont)[:, None]).sum()), abs=ATOL)


def test_chunk_budget_cutting_an_image_prefix_cache_and_preemption_change_nothing(engine, gemma_path):
    reqs = [{"messages": m} for m in CONVERSATIONS] * 2
    params = SamplingParams(max_tokens=5, temperature=0.8, seed=3, ignore_eos=True)
    expected = [o.token_ids for o in engine.generate(reqs, params, use_tqdm=False)]
    # 11-token steps over prompts of 40-60 tokens with 9-token images: some chunk boundaries would fall
    # inside an image, which then starts the next step whole.
    for kwargs in (
        {"max_num_batched_tokens": 11, "block_size": 4},
        {"enable_prefix_caching": False},
        {"block_size": 4, "num_blocks": 40, "max_model_len": 80},
    ):
        other = Engine(gemma_path, dtype="float32", **kwargs)
        assert [o.token_ids for o in other.generate(reqs, params, use_tqdm=False)] == expected, kwargs


def test_an_image_that_does_not_fit_the_steps_budget_moves_whole_to_the_next_step(gemma_path, reference):
    model, processor = reference
    engine = Engine(gemma_path, dtype="float32", max_num_batched_tokens=11)
    steps = []
    execute = engine.runner.execute

    def spy(plan, synchronize=False, **kwargs):
        steps.append((len(plan.input_ids), plan.image_chunks[:, 2].tolist()))
        return execute(plan, synchronize, **kwargs)

    engine.runner.execute = spy
    out = engine.generate([{"messages": CONVERSATIONS[2]}], SamplingParams(max_tokens=4), use_tqdm=False)[0]
    prefill = [step for step in steps if step[0] > 1][:-1]  # every prefill step but the prompt's last
    assert all(n == MM_TOKENS for _, runs in steps for n in runs)  # both images computed whole
    assert any(tokens < 11 for tokens, _ in prefill)  # a step stopped short of an image that did not fit
    _check_generation(model, processor, CONVERSATIONS[2], out, 4)


def test_prefix_cache_hit_ending_inside_an_image(gemma_path, reference):
    """The second prompt shares the first's blocks up to a block boundary inside the image (block size 12):
    its image's cached tokens were computed attending to the whole image, its uncached ones do now."""
    model, processor = reference
    engine = Engine(gemma_path, dtype="float32", block_size=12)
    engine.generate([{"messages": _chat(WIDE, "Which country is this dish from?")}], use_tqdm=False)
    second = _chat(WIDE, "Where was this photo taken?")
    out = engine.generate([{"messages": second}], SamplingParams(max_tokens=5), use_tqdm=False)[0]
    soft = [i for i, t in enumerate(out.prompt_token_ids) if t == model.config.image_token_id]
    assert soft[0] < out.num_cached_tokens <= soft[-1]
    _check_generation(model, processor, second, out, 5)


def test_an_image_longer_than_the_token_budget_is_that_requests_error(gemma_path):
    engine = Engine(gemma_path, dtype="float32", max_num_batched_tokens=MM_TOKENS - 1)
    outs = engine.generate(
        [{"messages": CONVERSATIONS[1]}, {"messages": CONVERSATIONS[0]}], SamplingParams(max_tokens=3), use_tqdm=False
    )
    assert outs[0].error and "max_num_batched_tokens" in outs[0].error, outs[0].error
    assert outs[1].error is None and len(outs[1].token_ids) > 0


def test_triton_kernels_give_the_torch_tokens(engine, gemma_path):
    req = [{"messages": CONVERSATIONS[2]}]
    params = SamplingParams(max_tokens=4)
    triton = Engine(gemma_path, dtype="float32", attention_backend="triton", max_num_batched_tokens=24)
    assert (
        triton.generate(req, params, use_tqdm=False)[0].token_ids
        == engine.generate(req, params, use_tqdm=False)[0].token_ids
    )


def test_fused_rotary_write_kv_changes_no_output(gemma_path):
    """Local (own rotary tables) and global layers, an image run, chunked prefill: fusion on and off agree."""
    reqs = [{"messages": m} for m in CONVERSATIONS[:2]]
    assert_rotary_fusion_changes_nothing(gemma_path, reqs, max_num_batched_tokens=24)


def test_pil_path_matches_transformers_pil_processor(gemma_path, reference):
    model, _ = reference
    processor = transformers.AutoProcessor.from_pretrained(gemma_path)
    processor.image_processor = transformers.AutoImageProcessor.from_pretrained(gemma_path, backend="pil")
    engine = Engine(gemma_path, dtype="float32", image_backend="pil")
    out = engine.generate([{"messages": CONVERSATIONS[1]}], SamplingParams(max_tokens=5), use_tqdm=False)[0]
    assert engine.provenance()["image_backend"] == "pil"
    _check_generation(model, processor, CONVERSATIONS[1], out, 5)


def test_pan_and_scan_crops_match_transformers(tmp_path):
    """Crops as preprocessor_config.json enables them. transformers' Gemma3Processor lets its own defaults
    (pan-and-scan off, 256-pixel crops) override the config's values, so the reference is given them."""
    path = build_tiny_gemma3(tmp_path / "pas", pan_and_scan=True)
    model = transformers.Gemma3ForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    processor = transformers.AutoProcessor.from_pretrained(path)
    engine = Engine(path, dtype="float32")
    convs = [_chat(WIDE, "Which country?"), _chat(SQUARE, "and", TALL, "?")]
    outs = engine.generate([{"messages": m} for m in convs], SamplingParams(max_tokens=4), use_tqdm=False)
    for messages, out in zip(convs, outs, strict=True):
        _check_generation(model, processor, messages, out, 4, **PAN_AND_SCAN)
    assert _inputs(processor, convs[0], **PAN_AND_SCAN)["pixel_values"].shape[0] == 4  # the wide image: 3 crops


def test_both_config_layouts_load_the_same(engine, gemma_path, tmp_path):
    old = shutil.copytree(gemma_path, tmp_path / "v4")
    config = json.loads((old / "config.json").read_text())
    text = config["text_config"]
    # transformers 4: rope_theta + rope_scaling for the full layers, rope_local_base_freq, torch_dtype.
    params = text.pop("rope_parameters")
    full = params["full_attention"]
    text.update(
        rope_theta=full["rope_theta"],
        rope_local_base_freq=params["sliding_attention"]["rope_theta"],
        rope_scaling={"rope_type": full["rope_type"], "factor": full["factor"]},
    )
    for c in (config, text, config["vision_config"]):
        if "dtype" in c:
            c["torch_dtype"] = c.pop("dtype")
    (old / "config.json").write_text(json.dumps(config))
    req = [{"messages": CONVERSATIONS[1]}]
    params = SamplingParams(max_tokens=5)
    new_out = engine.generate(req, params, use_tqdm=False)[0]
    old_out = Engine(old, dtype="float32").generate(req, params, use_tqdm=False)[0]
    assert old_out.token_ids == new_out.token_ids
    np.testing.assert_allclose(old_out.logprobs, new_out.logprobs, atol=1e-6)


def test_text_only_gemma3_matches_transformers(tmp_path):
    path = build_tiny_gemma3_text(tmp_path / "gemma3-text")
    model = transformers.Gemma3ForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    engine = Engine(path, dtype="float32")
    messages = _chat("Tell me about the festival of lights and the food, señor. 日本", system="Be brief.")
    out = engine.generate([{"messages": messages}], SamplingParams(max_tokens=8), use_tqdm=False)[0]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = ids["input_ids"]
    assert out.error is None and out.prompt_token_ids == ids and len(ids) > 3 * GEMMA_WINDOW
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()
        lp = torch.log_softmax(model(torch.tensor([ids + want])).logits[0].float(), -1)
    assert out.token_ids == want
    np.testing.assert_allclose(
        out.logprobs, lp[len(ids) - 1 : -1].gather(1, torch.tensor(want)[:, None])[:, 0], atol=ATOL
    )
    image_req = {"prompt": "<start_of_image> what?", "images": [SQUARE]}
    assert "text-only" in engine.generate([image_req], use_tqdm=False)[0].error


@pytest.mark.parametrize(
    "file,changes,needle",
    [
        ("config.json", {"mm_tokens_per_image": 8}, "mm_tokens_per_image 8"),
        ("config.json", {"text_config": {"layer_types": ["full_attention"]}}, "layer_types must list 3"),
        ("processor_config.json", {"image_seq_length": 16}, "image_seq_length 16 differs"),
        ("processor_config.json", {"image_processor": {"size": {"height": 40, "width": 40}}}, "42x42 images"),
    ],
)
def test_bad_configs_name_file_and_field(gemma_path, tmp_path, file, changes, needle):
    bad = shutil.copytree(gemma_path, tmp_path / "bad")
    config = json.loads((bad / file).read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    (bad / file).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=needle) as err:
        family_for(load_checkpoint(bad))
    assert file in str(err.value)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@CUDA
def test_cuda_triton_and_graphs_match_transformers(gemma_path, reference):
    """fp32 on the GPU (Triton prefill with image spans and windows, CUDA-graph decode) keeps the 1e-4 bar."""
    model, processor = reference
    engine = Engine(gemma_path, device="cuda", dtype="float32")
    assert engine.ops.backend == "triton" and engine.runner.decode_graphs is not None
    outs = engine.generate([{"messages": m} for m in CONVERSATIONS], SamplingParams(max_tokens=8), use_tqdm=False)
    for messages, out in zip(CONVERSATIONS, outs, strict=True):
        _check_generation(model, processor, messages, out, 8)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_bf16_choice_loglikelihoods_are_close_to_fp32(gemma_path, device):
    """Gemma's bf16 hazards (the rounded sqrt(hidden) embedding scale, (1 + w) norms kept in fp32) stay within
    the bar of tests/test_cuda.py for a tiny random model: 0.05 per token (the CPU measured 0.028 at most)."""
    reqs = [{"messages": m, "choices": ["Japan", " Peru", "Ghana and more"]} for m in CONVERSATIONS]
    bf16 = Engine(gemma_path, device=device, dtype="bfloat16").score(reqs, use_tqdm=False)
    fp32 = Engine(gemma_path, device=device, dtype="float32", attention_backend="torch").score(reqs, use_tqdm=False)
    diffs = []
    for a, b in zip(bf16, fp32, strict=True):
        assert a.error is None and b.error is None
        for ca, cb in zip(a.choices, b.choices, strict=True):
            diffs += [abs(x - y) for x, y in zip(ca.token_logprobs, cb.token_logprobs, strict=True)]
    print(f"gemma3 bf16 vs fp32 on {device}, per-token logprob: max |diff| {max(diffs):.4f}, mean {np.mean(diffs):.4f}")
    assert max(diffs) < 0.05
