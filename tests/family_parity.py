"""Checks every model family's tests share: chat inputs for transformers' processors, parity of greedy tokens,
log-probabilities and choice scores with transformers, serving features that must change no output, the
transformers-4 config layout, edited checkpoint files, CUDA against the CPU path, the fused rotary + KV-write
kernel against the pair it replaces. And the test images and conversations of the tiling families (0, 1 and 2
images of different sizes and aspect ratios)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

ATOL = 1e-4


def image(w: int, h: int, seed: int):
    """A noise image of `w` x `h` pixels."""
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


WIDE, TALL, SMALL, ODD, SQUARE = (
    image(90, 24, 1),
    image(22, 70, 2),
    image(20, 15, 3),
    image(37, 53, 4),
    image(30, 30, 5),
)


def user(*items) -> list[dict]:
    """One user message of images (PIL) and texts, in order."""
    content = [{"type": "text", "text": x} if isinstance(x, str) else {"type": "image", "image": x} for x in items]
    return [{"role": "user", "content": content}]


# 0, 1 and 2 images of different sizes and aspect ratios
CONVERSATIONS = [
    user("Tell me about the festival of lights, señor."),
    user(WIDE, "Which country is this dish from? 日本"),
    user(TALL, "and", SMALL, ": compare the two flags."),
    user(ODD, "Where?"),
    user(SQUARE, "What is it?"),
]


def reference(path, backend: str | None = None):
    """transformers' model (fp32, eager attention, eval) and processor (its image processor on `backend`: "pil",
    "torchvision", or transformers' default); the processor's video part, where it has one, stays on its default."""
    import transformers as t

    model = t.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    processor = t.AutoProcessor.from_pretrained(path)
    if backend is not None:
        processor.image_processor = t.AutoImageProcessor.from_pretrained(path, backend=backend)
    return model, processor


def chat_inputs(processor, messages, **template) -> dict:
    """transformers' inputs for a chat; `template`: `chat_template=<name or text>` where not the default."""
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", **template
    )


def extras(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}


@torch.no_grad()
def logprobs(model, ids: list[int], extras: dict) -> torch.Tensor:
    """Log-probabilities at every position of `ids`: the prompt's token types (Qwen's `mm_token_type_ids`)
    extended over the continuation as text."""
    extras = {
        k: torch.nn.functional.pad(v, (0, len(ids) - v.shape[1])) if k.endswith("token_type_ids") else v
        for k, v in extras.items()
    }
    return torch.log_softmax(model(input_ids=torch.tensor([ids]), **extras).logits[0].float(), dim=-1)


def assert_generations_match(engine, model, processor, conversations, max_tokens: int = 8) -> list[int]:
    """Token ids equal `apply_chat_template(tokenize=True)`'s, greedy tokens equal transformers', per-token
    log-probabilities within ATOL; returns each prompt's length."""
    from cultengine import SamplingParams

    # Greedy, as `generate(do_sample=False)`, whatever the checkpoint's sampling defaults (its repetition
    # penalty applies on both sides).
    outs = engine.generate(
        [{"messages": m} for m in conversations], SamplingParams(max_tokens=max_tokens, temperature=0), use_tqdm=False
    )
    lengths = []
    for messages, out in zip(conversations, outs, strict=True):
        inputs = chat_inputs(processor, messages)
        ids = inputs["input_ids"][0].tolist()
        assert out.error is None, out.error
        assert out.prompt_token_ids == ids
        with torch.no_grad():
            want = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)[0, len(ids) :].tolist()
        assert out.token_ids == want
        lp = logprobs(model, ids + want, extras(inputs))
        expected = lp[len(ids) - 1 : -1].gather(1, torch.tensor(want)[:, None]).squeeze(1)
        np.testing.assert_allclose(out.logprobs, expected.numpy(), atol=ATOL)
        lengths.append(len(ids))
    return lengths


def assert_choice_scores_match(engine, model, processor, conversations) -> None:
    """`Engine.score` choice log-likelihoods equal transformers' within ATOL."""
    choices = ["Japan", " Peru", "Ghana and more"]
    scores = engine.score([{"messages": m, "choices": choices} for m in conversations], use_tqdm=False)
    for messages, score in zip(conversations, scores, strict=True):
        assert score.error is None, score.error
        inputs = chat_inputs(processor, messages)
        ctx = inputs["input_ids"][0].tolist()
        for choice, got in zip(choices, score.choices, strict=True):
            cont = processor.tokenizer(choice, add_special_tokens=False)["input_ids"]
            lp = logprobs(model, ctx + cont, extras(inputs))[len(ctx) - 1 : -1]
            assert got.num_tokens == len(cont)
            want = float(lp.gather(1, torch.tensor(cont)[:, None]).sum())
            assert abs(got.logprob - want) <= ATOL, (choice, got.logprob, want)


def assert_serving_features_change_nothing(engine, path, conversations) -> None:
    """Prefix caching, the encoder cache, chunked prefill, a one-image step budget and preemption leave sampled
    outputs as they are; the encoder cache encodes a repeated image once; the budget spreads a step's images
    over several encoder calls; `score` shares each context."""
    from cultengine import Engine, SamplingParams

    reqs = [{"messages": m} for m in conversations] * 2
    params = SamplingParams(max_tokens=5, temperature=0.8, seed=3, ignore_eos=True)
    outs = engine.generate(reqs, params, use_tqdm=False)
    expected = [o.token_ids for o in outs]
    assert engine.stats()["prefix_cache_hit_tokens"] > 0  # the repeated conversations share their context
    longest = max(len(o.prompt_token_ids) for o in outs) + 5
    # A few KV blocks more than the longest sequence needs: sequences are preempted and recomputed (at some
    # of these sizes; which ones depends on the prompts' lengths).
    tight = [
        {"block_size": size, "num_blocks": -(-longest // size) + extra, "max_model_len": longest}
        for size in (4, 16)
        for extra in (1, 2, 4, 8, 16, 24)
    ]
    preemptions, calls = 0, {}
    for name, kwargs in (
        ("no prefix cache", {"enable_prefix_caching": False}),
        ("chunked", {"max_num_batched_tokens": 16, "block_size": 4}),
        ("budget", {"max_num_image_tokens": 1}),
        ("unbudgeted", {}),
        *((f"tight {i}", k) for i, k in enumerate(tight)),
    ):
        other = Engine(path, dtype="float32", **kwargs)
        encode, calls[name] = other.model.encode_images, []

        def recording(images, encode=encode, seen=calls[name]):
            seen.append(len(images))
            return encode(images)

        other.model.encode_images = recording
        assert [o.token_ids for o in other.generate(reqs, params, use_tqdm=False)] == expected, name
        preemptions += other.stats()["num_preemptions"]
        if name == "no prefix cache":  # every request embeds its images: the encoder cache encodes each once
            distinct = {id(item["image"]) for m in conversations for item in m[0]["content"] if "image" in item}
            assert other.stats()["images_encoded"] == len(distinct)
    assert preemptions > 0
    assert max(calls["budget"]) == 1 < max(calls["unbudgeted"])  # one image a step, whole; else several
    before = engine.stats()["prefix_cache_hit_tokens"]
    engine.score([{"messages": conversations[1], "choices": ["a", "b", "c", "d"]}], use_tqdm=False)
    assert engine.stats()["prefix_cache_hit_tokens"] - before >= 3 * 16


def unfused_rotary_write_kv(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping):
    """`ops.rotary_write_kv` with the fusion switched off: the rotary kernel, then the KV-write kernel."""
    from cultengine import kernels  # not at import: test_kernels sets TRITON_INTERPRET before triton loads

    q, k = kernels.rotary_embedding(q, k, positions, cos, sin)
    kernels.write_kv(k, v, k_cache, v_cache, slot_mapping)
    return q


def assert_rotary_fusion_changes_nothing(path: Path, requests: list[dict], **engine_kw) -> None:
    """The engine on the Triton kernels with the fused rotary + KV write and with the two kernels it replaces:
    the same tokens and bit-identical log-probabilities (eager steps: a captured graph would keep the fused one)."""
    from cultengine import Engine, SamplingParams

    device = "cuda" if torch.cuda.is_available() else "cpu"
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    runs = []
    for fused in (True, False):
        engine = Engine(
            path, device=device, dtype="float32", attention_backend="triton", cuda_graphs=False, **engine_kw
        )
        if not fused:
            engine.ops.rotary_write_kv = unfused_rotary_write_kv
        runs.append(engine.generate(requests, params, use_tqdm=False))
    for on, off in zip(*runs, strict=True):
        assert on.error is None and on.token_ids == off.token_ids and on.logprobs == off.logprobs


def to_transformers4_config(src: Path, dst: Path) -> Path:
    """A copy of a checkpoint whose config.json is in transformers 4's layout (torch_dtype, rope_theta)."""

    old = shutil.copytree(src, dst)
    config = json.loads((old / "config.json").read_text())
    text = config["text_config"]
    params = text.pop("rope_parameters", None) or {"rope_theta": text.pop("rope_theta")}
    text["rope_theta"], text["rope_scaling"] = params["rope_theta"], None
    for c in (config, text, config["vision_config"]):
        if "dtype" in c:
            c["torch_dtype"] = c.pop("dtype")
    (old / "config.json").write_text(json.dumps(config))
    return old


def edited(src: Path, dst: Path, file: str, **changes) -> Path:
    """A copy of a checkpoint with `changes` made in one JSON file (processor_config.json: its image processor
    part, or its top level for the keys that live there)."""

    d = shutil.copytree(src, dst)
    data = json.loads((d / file).read_text())
    for key, value in changes.items():
        target = data["image_processor"] if file == "processor_config.json" and key in data["image_processor"] else data
        target[key] = value
    (d / file).write_text(json.dumps(data))
    return d


def assert_cuda_matches_cpu(path: Path, conversations) -> None:
    """On CUDA (Triton kernels, CUDA-graph decode), fp32 generations equal the CPU torch path's (tokens, and
    log-probabilities within ATOL); bf16 choice log-likelihoods stay within 0.05 a token of fp32's."""
    from cultengine import Engine, SamplingParams

    reqs = [{"messages": m} for m in conversations]
    params = SamplingParams(max_tokens=8)
    cpu = Engine(path, dtype="float32").generate(reqs, params, use_tqdm=False)
    engine = Engine(path, device="cuda", dtype="float32")
    cuda = engine.generate(reqs, params, use_tqdm=False)
    assert engine.ops.backend == "triton" and engine.runner.decode_graphs.replays > 0
    for got, want in zip(cuda, cpu, strict=True):
        assert got.error is None and got.token_ids == want.token_ids
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=ATOL)
    scored = [{**r, "choices": ["Japan", " Peru"]} for r in reqs[1:3]]
    fp32 = engine.score(scored, use_tqdm=False)
    bf16 = Engine(path, device="cuda", dtype="bfloat16").score(scored, use_tqdm=False)
    for a, b in zip(fp32, bf16, strict=True):
        for ca, cb in zip(a.choices, b.choices, strict=True):
            assert abs(ca.logprob - cb.logprob) <= 0.05 * ca.num_tokens
