"""A small LLaVA checkpoint with random weights, built deterministically for the default benchmark.

It exists so `cultengine bench` runs on a fresh machine with nothing downloaded: its accuracy is chance
level; it demonstrates the pipeline and the engine's throughput. Layout: transformers `LlavaConfig`
(Llama decoder, CLIP vision tower), safetensors in the transformers-5 naming, a byte-level BPE
`tokenizer.json` trained with `tokenizers` on the benchmark's text, a ChatML chat template, a CLIP
preprocessor config and a generation config. Cached under $CULTENGINE_CACHE or ~/.cache/cultengine.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..paths import cache_dir

VERSION = 1
NAME = f"demo-llava-v{VERSION}"
SEED = 0
IMAGE_SIZE, PATCH = 112, 16  # 7 x 7 = 49 image tokens
TEXT = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)
VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _weights(vocab: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Every tensor LlavaForConditionalGeneration holds, in a fixed order so the draws are reproducible."""
    t, v = TEXT, VISION
    d, hd = t["hidden_size"], t["hidden_size"] // t["num_attention_heads"]
    kv = t["num_key_value_heads"] * hd
    vd, n_pos = v["hidden_size"], (IMAGE_SIZE // PATCH) ** 2 + 1
    w: dict[str, torch.Tensor] = {}

    def rand(name: str, *shape: int) -> None:
        w[name] = torch.randn(*shape, generator=gen) * 0.02

    def ones(name: str, n: int, bias: bool = False) -> None:
        w[name + ".weight"] = torch.ones(n)
        if bias:
            w[name + ".bias"] = torch.zeros(n)

    vp = "model.vision_tower.vision_model."
    rand(vp + "embeddings.class_embedding", vd)
    rand(vp + "embeddings.patch_embedding.weight", vd, 3, PATCH, PATCH)
    rand(vp + "embeddings.position_embedding.weight", n_pos, vd)
    ones(vp + "pre_layrnorm", vd, bias=True)  # sic: CLIP's name
    for i in range(v["num_hidden_layers"]):
        p = f"{vp}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            rand(p + f"self_attn.{proj}.weight", vd, vd)
            w[p + f"self_attn.{proj}.bias"] = torch.zeros(vd)
        ones(p + "layer_norm1", vd, bias=True)
        ones(p + "layer_norm2", vd, bias=True)
        rand(p + "mlp.fc1.weight", v["intermediate_size"], vd)
        w[p + "mlp.fc1.bias"] = torch.zeros(v["intermediate_size"])
        rand(p + "mlp.fc2.weight", vd, v["intermediate_size"])
        w[p + "mlp.fc2.bias"] = torch.zeros(vd)
    ones(vp + "post_layernorm", vd, bias=True)
    pp = "model.multi_modal_projector."
    rand(pp + "linear_1.weight", d, vd)
    w[pp + "linear_1.bias"] = torch.zeros(d)
    rand(pp + "linear_2.weight", d, d)
    w[pp + "linear_2.bias"] = torch.zeros(d)
    lp = "model.language_model."
    rand(lp + "embed_tokens.weight", vocab, d)
    for i in range(t["num_hidden_layers"]):
        p = f"{lp}layers.{i}."
        rand(p + "self_attn.q_proj.weight", d, d)
        rand(p + "self_attn.k_proj.weight", kv, d)
        rand(p + "self_attn.v_proj.weight", kv, d)
        rand(p + "self_attn.o_proj.weight", d, d)
        rand(p + "mlp.gate_proj.weight", t["intermediate_size"], d)
        rand(p + "mlp.up_proj.weight", t["intermediate_size"], d)
        rand(p + "mlp.down_proj.weight", d, t["intermediate_size"])
        ones(p + "input_layernorm", d)
        ones(p + "post_attention_layernorm", d)
    ones(lp + "norm", d)
    rand("lm_head.weight", vocab, d)
    return w


def _write(out: Path) -> None:
    from safetensors.torch import save_file

    from .default import corpus
    from .suites import TEMPLATES

    texts = corpus() + list(TEMPLATES.values()) + ["user", "assistant", "system"]
    tok = _train_tokenizer(texts)
    ids = {s: tok.token_to_id(s) for s in SPECIAL}
    vocab = (tok.get_vocab_size() + 63) // 64 * 64  # padded like real checkpoints
    tok.save(str(out / "tokenizer.json"))
    config = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": ids["<image>"],
        "image_seq_length": (IMAGE_SIZE // PATCH) ** 2,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "multimodal_projector_bias": True,
        "tie_word_embeddings": False,
        "dtype": "float32",
        "cultengine_demo": True,
        "text_config": {
            "model_type": "llama",
            "vocab_size": vocab,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "bos_token_id": None,
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "dtype": "float32",
            **TEXT,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH,
            "num_channels": 3,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "projection_dim": VISION["hidden_size"],
            **VISION,
        },
    }
    added = {
        str(ids[s]): {
            "content": s,
            "special": True,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
        }
        for s in SPECIAL
    }
    files = {
        "config.json": config,
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": CHAT_TEMPLATE,
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "model_max_length": TEXT["max_position_embeddings"],
            "added_tokens_decoder": added,
            "extra_special_tokens": {"image_token": "<image>"},
        },
        "generation_config.json": {
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "pad_token_id": ids["<|endoftext|>"],
            "do_sample": False,
        },
        "preprocessor_config.json": {
            "image_processor_type": "CLIPImageProcessor",
            "processor_class": "LlavaProcessor",
            "do_resize": True,
            "size": {"shortest_edge": IMAGE_SIZE},
            "resample": 3,
            "do_center_crop": True,
            "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
            "do_convert_rgb": True,
        },
        "processor_config.json": {
            "processor_class": "LlavaProcessor",
            "patch_size": PATCH,
            "vision_feature_select_strategy": "default",
            "image_token": "<image>",
            "num_additional_image_tokens": 1,
        },
    }
    for name, data in files.items():
        (out / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    gen = torch.Generator().manual_seed(SEED)
    save_file(_weights(vocab, gen), str(out / "model.safetensors"), metadata={"format": "pt"})


def ensure(root: Path | None = None) -> Path:
    """The demo checkpoint directory, built on first use (atomically, so a killed build is redone)."""
    path = (root or cache_dir()) / NAME
    if (path / "config.json").is_file():
        return path
    tmp = path.with_name(f"{NAME}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write(tmp)
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve(model: str | None) -> Path:
    """A `--model` value: a checkpoint directory, or 'demo' / nothing for the demo checkpoint. A file (a weights
    file, a config.json) is a ValueError naming it."""
    if model in (None, "", "demo"):
        return ensure()
    path = Path(model).expanduser()
    if path.is_file():
        raise ValueError(
            f"--model {model}: not a directory (a checkpoint is the folder holding config.json and the "
            f"*.safetensors weights{f'; perhaps --model {path.parent}' if path.parent != Path() else ''})"
        )
    return path
