"""Tiny random tiling checkpoints built with transformers: Idefics3, SmolVLM and InternVL (no network, seconds).

Public API (importable from any test: `from tiny_tiles import ...`):

- `build_tiny_tiles(out_dir, family, seed=0) -> pathlib.Path` writes a complete checkpoint directory
  (config.json, safetensors weights, generation_config.json, tokenizer.json + tokenizer_config.json with the
  family's special tokens, processor_config.json with the family's own processor and chat template).
  Families (`TILE_FAMILIES`):
    "idefics3"   Idefics3ForConditionalGeneration: SigLIP-style tower on 56-px tiles (4 x 4 patches of 14),
                 scale_factor 2 (4 tokens a tile), Llama decoder, images resized to a 168-px longest edge and
                 split into up to 3 x 3 tiles plus the global image (Lanczos).
    "smolvlm"    SmolVLMForConditionalGeneration: 51-px tiles of 2-px patches (25 x 25, a ragged 1-px edge, and
                 a patch grid whose Idefics3 position ids are not 0..n-1), scale_factor 5 (25 tokens a tile),
                 tied Llama (SmolLM2-style) decoder, SmolVLM's own chat template, up to 2 x 2 tiles + global.
    "internvl"   InternVLForConditionalGeneration: InternViT (LayerNorm, layer scale, CLS token, absolute
                 positions) on 28-px tiles of 7-px patches, downsample_ratio 0.5 (4 tokens a tile), Qwen2
                 decoder, 1..6 tiles by aspect ratio plus a thumbnail.
    "internvl_qk" InternVL with RMSNorm, q/k norms, q/k/v biases, a final LayerNorm (no mean pooling), an
                 untied lm_head and vision_feature_layer -2.
    "internvl_qwen3" InternVL3.5's layout: InternVL3's tower before a Qwen3 decoder (per-head q/k norms).
- `reference_tiles(path, backend=None)`: transformers' model (fp32, eager) and processor (`backend`: "pil",
  "torchvision" or transformers' default).
- Shared checks: test images `WIDE, TALL, SMALL, ODD, SQUARE`, `user(...)`, `CONVERSATIONS` (0, 1 and 2 images),
  `assert_generations_match`, `assert_choice_scores_match`, `assert_serving_features_change_nothing`,
  `to_transformers4_config`, `edited`, `assert_cuda_matches_cpu` (CUDA tests, skipped without a GPU).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import AddedToken, Tokenizer

from tiny_checkpoints import _train_tokenizer

TILE_FAMILIES = ("idefics3", "smolvlm", "internvl", "internvl_qk", "internvl_qwen3")

IDEFICS3_TOKENS = [
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
    *[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
]
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"]

# Idefics3-8B-Llama3's template (its BOS as the tokenizer's) and SmolVLM2's (transformers' default for it).
IDEFICS3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# The template OpenGVLab's -hf conversions ship: an image is `<IMG_CONTEXT>` and a newline.
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)


def _tokenizer(extra: list[str]) -> Tokenizer:
    tok = Tokenizer.from_str(_train_tokenizer().to_str())
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in extra])
    return tok


def _text(kind: str, vocab: int, **kw):
    t = transformers
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    return {"llama": t.LlamaConfig, "qwen2": t.Qwen2Config, "qwen3": t.Qwen3Config}[kind](**common, **kw)


def _perturb(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # the default init leaves biases at 0, norms at 1 and layer scales equal: perturb all
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.08)


def build_tiny_tiles(out_dir: str | Path, family: str = "idefics3", seed: int = 0) -> Path:
    t = transformers
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if family in ("idefics3", "smolvlm"):
        tok = _tokenizer(IDEFICS3_TOKENS)
        vocab = (tok.get_vocab_size() + 31) // 32 * 32
        eos = [1, tok.token_to_id("<end_of_utterance>")]
        if family == "idefics3":
            vision = t.Idefics3VisionConfig(
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=56,
                patch_size=14,
            )
            config = t.Idefics3Config(
                vision_config=vision,
                text_config=_text("llama", vocab),
                scale_factor=2,
                image_token_id=tok.token_to_id("<image>"),
            )
            model = t.Idefics3ForConditionalGeneration(config).eval()
            processor_cls, image_cls, template, seq_len = (
                t.Idefics3Processor,
                t.Idefics3ImageProcessor,
                IDEFICS3_TEMPLATE,
                4,
            )
            image_kw = dict(size={"longest_edge": 168}, max_image_size={"longest_edge": 56})
            extra = {}
        else:
            vision = t.SmolVLMVisionConfig(
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=51,
                patch_size=2,
            )
            config = t.SmolVLMConfig(
                vision_config=vision,
                text_config=_text("llama", vocab, tie_word_embeddings=True),
                scale_factor=5,
                image_token_id=tok.token_to_id("<image>"),
                tie_word_embeddings=True,
            )
            model = t.SmolVLMForConditionalGeneration(config).eval()
            processor_cls, image_cls, template, seq_len = (
                t.SmolVLMProcessor,
                t.SmolVLMImageProcessor,
                SMOLVLM_TEMPLATE,
                25,
            )
            image_kw = dict(size={"longest_edge": 102}, max_image_size={"longest_edge": 51})
            extra = dict(video_processor=t.SmolVLMVideoProcessor())
        fast = t.PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", chat_template=template
        )
        processor = processor_cls(
            image_processor=image_cls(**image_kw),
            tokenizer=fast,
            image_seq_len=seq_len,
            chat_template=template,
            **extra,
        )
    elif family in ("internvl", "internvl_qk", "internvl_qwen3"):
        tok = _tokenizer(INTERNVL_TOKENS)
        vocab = (tok.get_vocab_size() + 31) // 32 * 32
        eos = [1, tok.token_to_id("<|im_end|>")]
        qk = family == "internvl_qk"
        vision = t.InternVLVisionConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=28,
            patch_size=7,
            norm_type="rms_norm" if qk else "layer_norm",
            use_qk_norm=qk,
            attention_bias=qk,
            use_mean_pooling=not qk,
        )
        text = (
            _text("qwen3", vocab, head_dim=16, rope_theta=1e6)
            if family == "internvl_qwen3"
            else _text("qwen2", vocab, rope_theta=1e6)
        )
        config = t.InternVLConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=tok.token_to_id("<IMG_CONTEXT>"),
            image_seq_length=4,
            downsample_ratio=0.5,
            vision_feature_layer=-2 if qk else -1,
            tie_word_embeddings=not qk,
        )
        model = t.InternVLForConditionalGeneration(config).eval()
        fast = t.PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<pad>",
            chat_template=INTERNVL_TEMPLATE,
            extra_special_tokens={
                "start_image_token": "<img>",
                "end_image_token": "</img>",
                "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>",
            },
        )
        image = t.GotOcr2ImageProcessor(
            size={"height": 28, "width": 28},
            min_patches=1,
            max_patches=6,
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        )
        processor = t.InternVLProcessor(
            image_processor=image,
            tokenizer=fast,
            video_processor=t.InternVLVideoProcessor(),
            image_seq_length=4,
            chat_template=INTERNVL_TEMPLATE,
        )
    else:
        raise ValueError(f"unknown family {family!r}; choose one of {TILE_FAMILIES}")
    _perturb(model, seed)
    model.save_pretrained(out, safe_serialization=True)
    t.GenerationConfig(bos_token_id=0, eos_token_id=eos, pad_token_id=2).save_pretrained(out)
    processor.save_pretrained(out)
    return out


def reference_tiles(path: str | Path, backend: str | None = None):
    """transformers' model (fp32, eval, eager attention) and processor (its image processor on `backend`)."""
    t = transformers
    model = t.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    processor = t.AutoProcessor.from_pretrained(path)
    if backend is not None:
        processor.image_processor = t.AutoImageProcessor.from_pretrained(path, backend=backend)
    return model, processor


# ---------------------------------------------------------------------------------------------
# Shared checks of the tiling families' tests (test_idefics3.py, test_internvl.py)
# ---------------------------------------------------------------------------------------------
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


def chat_inputs(processor, messages) -> dict:
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def _extras(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}


@torch.no_grad()
def _logprobs(model, ids: list[int], extras: dict) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=torch.tensor([ids]), **extras).logits[0].float(), dim=-1)


def assert_generations_match(engine, model, processor, conversations, max_tokens: int = 8) -> list[int]:
    """Token ids equal `apply_chat_template(tokenize=True)`'s, greedy tokens equal transformers', per-token
    log-probabilities within ATOL; returns each prompt's length."""
    from cultengine import SamplingParams

    outs = engine.generate(
        [{"messages": m} for m in conversations], SamplingParams(max_tokens=max_tokens), use_tqdm=False
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
        lp = _logprobs(model, ids + want, _extras(inputs))
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
            lp = _logprobs(model, ctx + cont, _extras(inputs))[len(ctx) - 1 : -1]
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


def to_transformers4_config(src: Path, dst: Path) -> Path:
    """A copy of a checkpoint whose config.json is in transformers 4's layout (torch_dtype, rope_theta)."""
    import json
    import shutil

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
    import json
    import shutil

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
