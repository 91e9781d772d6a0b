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
- Shared checks: test images `WIDE, TALL, SMALL, ODD, SQUARE`, `user(...)`, `CONVERSATIONS` (0, 1 and 2 images),
  `assert_generations_match`, `assert_choice_scores_match`, `assert_serving_features_change_nothing`,
  `to_transformers4_config`, `edited`, `assert_cuda_matches_cpu` (CUDA tests, skipped without a GPU).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken, Tokenizer

from tiny_checkpoints import _train_tokenizer, perturb

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
    perturb(model, seed)
    model.save_pretrained(out, safe_serialization=True)
    t.GenerationConfig(bos_token_id=0, eos_token_id=eos, pad_token_id=2).save_pretrained(out)
    processor.save_pretrained(out)
    return out
