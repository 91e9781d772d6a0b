"""Tiny random Gemma 3 and text-only checkpoints built with transformers, for parity tests (no network).

- `build_tiny_gemma3(out_dir, seed=0, pan_and_scan=False) -> Path`: `Gemma3ForConditionalGeneration` with a
  3-layer decoder mixing `sliding_attention` (window `GEMMA_WINDOW` = 6, shorter than every test prompt and
  than an image's 9 soft tokens) and `full_attention` layers, linear RoPE scaling on the full layers,
  `query_pre_attn_scalar` != head_dim, final-logit soft-capping; a SigLIP tower on 42-pixel images (6x6
  patches of 7) pooled to `mm_tokens_per_image` = 9; Gemma's chat template (system folded into the first
  user turn); a BPE tokenizer trained here whose merges make "\\n" + "\\n\\n" tokenize unlike "\\n\\n\\n" (so
  the processor's newlines around each image must be tokenized with the text, as it does).
- `build_tiny_gemma3_text(out_dir)`: `Gemma3ForCausalLM` with the same decoder.
- `build_tiny_text(out_dir, arch)`: `LlamaForCausalLM`, `MistralForCausalLM` (sliding window 12) or
  `Qwen2ForCausalLM` / `Qwen3ForCausalLM` (sliding window 12 on the second layer only, `max_window_layers` = 1).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
import transformers

from tiny_checkpoints import CHAT_TEMPLATE, CORPUS, _train_tokenizer, perturb

GEMMA_WINDOW = 6
PAN_AND_SCAN = dict(
    do_pan_and_scan=True,
    pan_and_scan_min_crop_size=14,
    pan_and_scan_max_num_crops=3,
    pan_and_scan_min_ratio_to_activate=1.2,
)
MM_TOKENS = 9
GEMMA_SPECIAL = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
_GEMMA_CORPUS = CORPUS + ["user\n\n\nmodel\n\nHere is\n\n\n\nthe answer.\n\n", "crops to help you see better\n\n"] * 4


@lru_cache(maxsize=1)
def _gemma_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=440,
        special_tokens=GEMMA_SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_GEMMA_CORPUS, trainer)
    return tok


def _gemma_fast_tokenizer(template: str | None = GEMMA_TEMPLATE):
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=_gemma_tokenizer(),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        chat_template=template,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )


def _gemma_text_config(vocab: int):
    return transformers.Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=GEMMA_WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=512,
        final_logit_softcapping=30.0,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100_000.0},
        },
    )


def _perturb_and_save(model, out: Path, seed: int) -> None:
    perturb(model, seed)
    model.save_pretrained(out, safe_serialization=True)


def _vocab(tok) -> int:
    return (tok.get_vocab_size() + 31) // 32 * 32


def build_tiny_gemma3(out_dir: str | Path, seed: int = 0, pan_and_scan: bool = False) -> Path:
    t = transformers
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _gemma_tokenizer()
    ids = {s: tok.token_to_id(s) for s in GEMMA_SPECIAL}
    config = t.Gemma3Config(
        text_config=_gemma_text_config(_vocab(tok)),
        vision_config=t.SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=42,
            patch_size=7,
        ),
        mm_tokens_per_image=MM_TOKENS,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    torch.manual_seed(seed)
    _perturb_and_save(t.Gemma3ForConditionalGeneration(config).eval(), out, seed)
    t.GenerationConfig(bos_token_id=2, eos_token_id=[1, ids["<end_of_turn>"]], pad_token_id=0).save_pretrained(out)
    fast = _gemma_fast_tokenizer()
    crops = PAN_AND_SCAN if pan_and_scan else {}
    image_processor = t.Gemma3ImageProcessor(size={"height": 42, "width": 42}, **crops)
    t.Gemma3Processor(
        image_processor=image_processor, tokenizer=fast, chat_template=GEMMA_TEMPLATE, image_seq_length=MM_TOKENS
    ).save_pretrained(out)
    fast.save_pretrained(out)
    return out


def build_tiny_gemma3_text(out_dir: str | Path, seed: int = 0) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = _gemma_text_config(_vocab(_gemma_tokenizer()))
    torch.manual_seed(seed)
    _perturb_and_save(transformers.Gemma3ForCausalLM(config).eval(), out, seed)
    transformers.GenerationConfig(bos_token_id=2, eos_token_id=[1, 4], pad_token_id=0).save_pretrained(out)
    _gemma_fast_tokenizer().save_pretrained(out)
    return out


TEXT_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
TEXT_WINDOW = 12


def build_tiny_text(out_dir: str | Path, arch: str, seed: int = 0) -> Path:
    t = transformers
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer()
    torch.manual_seed(seed)
    common = dict(
        vocab_size=_vocab(tok),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    if arch == "LlamaForCausalLM":
        model = t.LlamaForCausalLM(t.LlamaConfig(**common, tie_word_embeddings=True))
    elif arch == "MistralForCausalLM":
        model = t.MistralForCausalLM(t.MistralConfig(**common, head_dim=24, sliding_window=TEXT_WINDOW))
    elif arch == "Qwen2ForCausalLM":
        model = t.Qwen2ForCausalLM(
            t.Qwen2Config(
                **common, rope_theta=1e6, use_sliding_window=True, sliding_window=TEXT_WINDOW, max_window_layers=1
            )
        )
    elif arch == "Qwen3ForCausalLM":
        model = t.Qwen3ForCausalLM(
            t.Qwen3Config(
                **common,
                head_dim=16,
                rope_theta=1e6,
                use_sliding_window=True,
                sliding_window=TEXT_WINDOW,
                max_window_layers=1,
            )
        )
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {TEXT_ARCHS}")
    _perturb_and_save(model.eval(), out, seed)
    t.GenerationConfig(bos_token_id=0, eos_token_id=[1, tok.token_to_id("<|im_end|>")], pad_token_id=2).save_pretrained(
        out
    )
    t.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", chat_template=CHAT_TEMPLATE
    ).save_pretrained(out)
    return out


def config_of(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())
