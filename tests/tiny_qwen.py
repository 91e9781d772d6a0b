"""Tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints built with transformers (no network, seconds).

Public API (tests/ is on sys.path):

- `QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")`
- `build_tiny_qwen(out_dir, family, seed=0) -> Path`: config.json, safetensors weights, generation config, a
  ByteLevel BPE tokenizer trained here with Qwen's special tokens, Qwen2-VL's chat template (images as
  `<|vision_start|><|image_pad|><|vision_end|>`, videos as `<|video_pad|>`), and the family's processor
  files (`Qwen2VLImageProcessor` with `min_pixels` 2 and `max_pixels` 24 merged patches, so small
  images are enlarged and large ones shrunk). Shapes:
    decoder: hidden 64, 4 heads on 2 KV heads (head_dim 16, mrope_section [2, 3, 3]), 2 layers;
      qwen2_vl untied lm_head, qwen2_5_vl tied, qwen3_vl Qwen3 (q/k norms), untied.
    tower: width 32, 2 heads (head_dim 16), 3 blocks, 2x2 merger; patch 14 (factor 28), Qwen3-VL 16 (32).
      qwen2_5_vl: window_size 56 (2x2 merged patches per window), full attention in block 1 only.
      qwen3_vl: a 4x4 learned position grid (interpolated per image), DeepStack after blocks 0 and 1.
  Weights are random with extra noise so biases and norms are non-trivial.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import transformers

from tiny_checkpoints import perturb

QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen2-VL's own template.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "You are a helpful assistant. What is shown in this picture? Describe the festival and the food.",
    "Un café au lait, s'il vous plaît. Crème brûlée à la française.",
    "日本語のテキストと祭りの写真。中文文本，春节快乐。",
    "مرحبا بالعالم — नमस्ते दुनिया — 안녕하세요 🎉🍜🏮 Answer with A, B, C or D.",
] * 4


@lru_cache(maxsize=1)
def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _config(family: str, tok):
    t = transformers
    ids = {name: tok.token_to_id(f"<|{name}|>") for name in ("image_pad", "video_pad", "vision_start", "vision_end")}
    vocab = (tok.get_vocab_size() + 31) // 32 * 32
    text = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=tok.token_to_id("<|im_end|>"),
        pad_token_id=0,
    )
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}
    vision = dict(depth=3, num_heads=2, in_channels=3, spatial_merge_size=2, temporal_patch_size=2)
    tokens = dict(
        image_token_id=ids["image_pad"],
        video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
    )
    if family == "qwen2_vl":
        return t.Qwen2VLConfig(
            text_config={**text, "rope_parameters": rope},
            vision_config=dict(**vision, embed_dim=32, hidden_size=64, mlp_ratio=2, patch_size=14),
            tie_word_embeddings=False,
            **tokens,
        )
    if family == "qwen2_5_vl":
        return t.Qwen2_5_VLConfig(
            text_config={**text, "rope_parameters": rope, "tie_word_embeddings": True},
            vision_config=dict(
                **vision,
                hidden_size=32,
                intermediate_size=48,
                out_hidden_size=64,
                patch_size=14,
                window_size=56,
                fullatt_block_indexes=[1],
            ),
            tie_word_embeddings=True,
            **tokens,
        )
    if family == "qwen3_vl":
        return t.Qwen3VLConfig(
            text_config={**text, "head_dim": 16, "rope_parameters": {**rope, "mrope_interleaved": True}},
            vision_config=dict(
                **vision,
                hidden_size=32,
                intermediate_size=48,
                out_hidden_size=64,
                patch_size=16,
                num_position_embeddings=16,
                deepstack_visual_indexes=[0, 1],
            ),
            tie_word_embeddings=False,
            **tokens,
        )
    raise ValueError(f"unknown family {family!r}; choose one of {QWEN_FAMILIES}")


def build_tiny_qwen(out_dir: str | Path, family: str = "qwen2_vl", seed: int = 0) -> Path:
    t = transformers
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer()
    config = _config(family, tok)
    torch.manual_seed(seed)
    model = t.AutoModelForImageTextToText.from_config(config).eval()
    perturb(model, seed)
    model.save_pretrained(out, safe_serialization=True)
    im_end = tok.token_to_id("<|im_end|>")
    t.GenerationConfig(eos_token_id=[im_end, tok.token_to_id("<|endoftext|>")], pad_token_id=0).save_pretrained(out)
    fast = t.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )
    patch = config.vision_config.patch_size
    factor = patch * 2
    image_processor = t.Qwen2VLImageProcessor(
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=2 * factor * factor,
        max_pixels=24 * factor * factor,
    )
    video_processor = t.Qwen2VLVideoProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2)
    processor_cls = {
        "qwen2_vl": t.Qwen2VLProcessor,
        "qwen2_5_vl": t.Qwen2_5_VLProcessor,
        "qwen3_vl": t.Qwen3VLProcessor,
    }[family]
    processor_cls(
        image_processor=image_processor, tokenizer=fast, video_processor=video_processor, chat_template=CHAT_TEMPLATE
    ).save_pretrained(out)
    fast.save_pretrained(out)
    return out
