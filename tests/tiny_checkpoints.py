"""Tiny random LLaVA checkpoints built with transformers, for parity tests (no network, a few seconds).

Public API (importable from any test: `from tiny_checkpoints import ...`, tests/ is on sys.path):

- `build_tiny_llava(out_dir, backbone="llama", seed=0) -> pathlib.Path`
    Writes a complete checkpoint directory and returns it: config.json (LlavaForConditionalGeneration),
    *.safetensors weights, generation_config.json (eos = [</s>, <|im_end|>]), tokenizer.json +
    tokenizer_config.json (ByteLevel BPE trained here on a small corpus with non-ASCII text), a ChatML
    chat template that renders `{"type": "image"}` items as `<image>\\n`, preprocessor_config.json
    (CLIPImageProcessor, shortest_edge 28, crop 28x28). Backbones (`BACKBONES`):
      "llama"   GQA (4 q / 2 kv heads), tied embeddings, vision_feature_layer -2, "default" strategy
                (4 image tokens), transformers' own single-file layout (`language_model.model.*`),
                chat template in chat_template.jinja.
      "qwen2"   q/k/v biases, untied lm_head, vision_feature_layer [-3, -1], "full" strategy
                (5 image tokens), projector without bias, new layout (`model.language_model.*`,
                `model.vision_tower.vision_model.*`) sharded in 2 files with an index, chat template
                inside tokenizer_config.json.
      "mistral" explicit head_dim (24 != hidden/heads), GQA, untied, vision_feature_layer -1.
    Weights are random (fixed seed) with extra noise so biases and norms are non-trivial.
- `IMAGE_TOKEN = "<image>"`, `SPECIAL_TOKENS` (in id order: <s>=0, </s>=1, <pad>=2, <image>=3,
  <|im_start|>=4, <|im_end|>=5), `CHAT_TEMPLATE`, `CORPUS`.
- `reference_model(path)`: transformers' `LlavaForConditionalGeneration` in fp32, eval mode.

conftest.py exposes them as session-scoped fixtures: `tiny_checkpoint(backbone)` (a factory, cached
per session), `tiny_llama`, `tiny_qwen2`, `tiny_mistral` (paths).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
import transformers

_REPO = Path(__file__).resolve().parents[1]


BACKBONES = ("llama", "qwen2", "mistral")
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", IMAGE_TOKEN, "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is shown in this picture? Describe the festival, the food and the clothing.",
    "Un café au lait, s'il vous plaît. Crème brûlée à la française.",
    "Привет, как дела? Это традиционный праздник.",
    "日本語のテキストと祭りの写真。中文文本，春节快乐。",
    "مرحبا بالعالم — नमस्ते दुनिया — 안녕하세요 🎉🍜🏮",
    "Answer with a single letter: A, B, C or D.",
] * 4

_PREPROCESSOR = {
    "image_processor_type": "CLIPImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 28},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 28, "width": 28},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_convert_rgb": True,
}


@lru_cache(maxsize=1)
def perturb(model, seed: int, scale: float = 0.08) -> None:
    """Add Gaussian noise to every parameter: transformers' default init leaves biases at 0, norms at 1 (Gemma's
    1 + w at 0) and layer scales equal, which would hide a wrong bias, norm or scale."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _configs(backbone: str, vocab: int, image_token_id: int):
    t = transformers
    CLIPVisionConfig, LlamaConfig, LlavaConfig = t.CLIPVisionConfig, t.LlamaConfig, t.LlavaConfig
    MistralConfig, Qwen2Config = t.MistralConfig, t.Qwen2Config

    common = dict(
        vocab_size=vocab,
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
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        projection_dim=32,
    )
    if backbone == "llama":
        text = LlamaConfig(**common, tie_word_embeddings=True)
        extra = dict(vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=True)
    elif backbone == "qwen2":
        text = Qwen2Config(**common, tie_word_embeddings=False, rope_theta=1e6)
        extra = dict(
            vision_feature_layer=[-3, -1], vision_feature_select_strategy="full", multimodal_projector_bias=False
        )
    elif backbone == "mistral":
        text = MistralConfig(**common, head_dim=24, tie_word_embeddings=False, sliding_window=None)
        extra = dict(vision_feature_layer=-1, vision_feature_select_strategy="default")
    else:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {BACKBONES}")
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id, projector_hidden_act="gelu", **extra
    )


def _new_layout(name: str) -> str:
    for old, new in (
        ("language_model.lm_head.", "lm_head."),
        ("language_model.model.", "model.language_model."),
        ("vision_tower.", "model.vision_tower.vision_model."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ):
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def _reshard_new_layout(out: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = {_new_layout(k): v for k, v in load_file(out / "model.safetensors").items()}
    (out / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, out / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, fname))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def build_tiny_llava(out_dir: str | Path, backbone: str = "llama", seed: int = 0) -> Path:
    t = transformers
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer()
    image_token_id = tok.token_to_id(IMAGE_TOKEN)
    vocab = (tok.get_vocab_size() + 31) // 32 * 32  # padded, like real checkpoints
    config = _configs(backbone, vocab, image_token_id)

    torch.manual_seed(seed)
    model = t.LlavaForConditionalGeneration(config).eval()
    perturb(model, seed)
    model.save_pretrained(out, safe_serialization=True)
    t.GenerationConfig(bos_token_id=0, eos_token_id=[1, tok.token_to_id("<|im_end|>")], pad_token_id=2).save_pretrained(
        out
    )

    fast = t.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", chat_template=CHAT_TEMPLATE
    )
    fast.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(_PREPROCESSOR, indent=2))

    if backbone == "qwen2":
        _reshard_new_layout(out)
        # Older checkpoints keep the template in tokenizer_config.json: exercise that path too.
        (out / "chat_template.jinja").unlink(missing_ok=True)
        tc = json.loads((out / "tokenizer_config.json").read_text())
        tc["chat_template"] = CHAT_TEMPLATE
        (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    return out


def reference_model(path: str | Path):
    """transformers' LLaVA on the checkpoint, fp32, eval mode (the parity oracle)."""
    return transformers.LlavaForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


# ---------------------------------------------------------------------------------------------
# LLaVA-NeXT and LLaVA-OneVision: any-resolution tiling on 28-pixel tiles (2 x 2 patches of 14)
# ---------------------------------------------------------------------------------------------
NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]
ONEVISION_PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56], [28, 84], [84, 28], [84, 84]]
ANYRES_FAMILIES = ("llava_next", "llava_next_mistral", "llava_onevision")


def _save_family(out: Path, model, tok, processor_cls, image_processor, seed: int, **processor_kwargs) -> Path:
    """Perturbed random weights, generation config, tokenizer, the family's own processor files."""
    t = transformers
    perturb(model, seed)
    model.save_pretrained(out, safe_serialization=True)
    t.GenerationConfig(bos_token_id=0, eos_token_id=[1, tok.token_to_id("<|im_end|>")], pad_token_id=2).save_pretrained(
        out
    )
    fast = t.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", chat_template=CHAT_TEMPLATE
    )
    processor_cls(
        image_processor=image_processor, tokenizer=fast, chat_template=CHAT_TEMPLATE, **processor_kwargs
    ).save_pretrained(out)
    fast.save_pretrained(out)
    return out


def build_tiny_anyres(out_dir: str | Path, family: str = "llava_next", seed: int = 0) -> Path:
    """A tiny LLaVA-NeXT (`llava_next`: Llama decoder, CLIP tower; `llava_next_mistral`) or LLaVA-OneVision
    (`llava_onevision`: Qwen2 decoder, SigLIP tower, `anyres_max_2` so large grids are shrunk) checkpoint."""
    t = transformers
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer()
    image_token_id = tok.token_to_id(IMAGE_TOKEN)
    vocab = (tok.get_vocab_size() + 31) // 32 * 32
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    vision = dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14
    )
    torch.manual_seed(seed)
    if family in ("llava_next", "llava_next_mistral"):
        text = (
            t.LlamaConfig(**common)
            if family == "llava_next"
            else t.MistralConfig(**common, head_dim=24, sliding_window=None)
        )
        config = t.LlavaNextConfig(
            vision_config=t.CLIPVisionConfig(**vision, projection_dim=32),
            text_config=text,
            image_token_index=image_token_id,
            image_grid_pinpoints=NEXT_PINPOINTS,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
        )
        model = t.LlavaNextForConditionalGeneration(config).eval()
        processor = t.LlavaNextImageProcessor(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, image_grid_pinpoints=NEXT_PINPOINTS
        )
        return _save_family(
            out,
            model,
            tok,
            t.LlavaNextProcessor,
            processor,
            seed,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
    if family == "llava_onevision":
        config = t.LlavaOnevisionConfig(
            vision_config=t.SiglipVisionConfig(**vision),
            text_config=t.Qwen2Config(**common, rope_theta=1e6),
            image_token_index=image_token_id,
            image_grid_pinpoints=ONEVISION_PINPOINTS,
            vision_aspect_ratio="anyres_max_2",
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
        )
        model = t.LlavaOnevisionForConditionalGeneration(config).eval()
        processor = t.LlavaOnevisionImageProcessor(
            size={"height": 28, "width": 28}, image_grid_pinpoints=ONEVISION_PINPOINTS
        )
        return _save_family(
            out,
            model,
            tok,
            t.LlavaOnevisionProcessor,
            processor,
            seed,
            num_image_tokens=4,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_2",
            video_processor=t.LlavaOnevisionVideoProcessor(),
        )
    raise ValueError(f"unknown family {family!r}; choose one of {ANYRES_FAMILIES}")
