"""Checkpoint loading: config files, safetensors weights, tokenizer/template/preprocessor paths.

Only `*.safetensors` weights are read (memory-mapped through `safe_open`); pickle files are never
unpickled and no code shipped with a checkpoint is ever executed. Weight names are normalised to the
transformers-5 in-memory layout (`model.language_model.*`, `model.vision_tower.*`,
`model.multi_modal_projector.*`, `lm_head.*`) whatever layout the files use.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = ("LlavaForConditionalGeneration",)
SUPPORTED_TEXT_MODELS = ("llama", "qwen2", "mistral")
SUPPORTED_VISION_MODELS = ("clip_vision_model",)

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}

# transformers' config defaults for the fields a Hub config.json may leave out (real LLaVA configs
# often give only the fields that differ from these).
_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
                  attention_bias=False, mlp_bias=False, hidden_act="silu", tie_word_embeddings=False),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                    rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False),
}
_VISION_DEFAULTS: dict[str, Any] = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                                        hidden_act="quick_gelu", layer_norm_eps=1e-5)
_LLAVA_DEFAULTS: dict[str, Any] = dict(image_token_index=32000, projector_hidden_act="gelu",
                                       vision_feature_select_strategy="default", vision_feature_layer=-2,
                                       multimodal_projector_bias=True)
_VISION_LLAVA_DEFAULTS = dict(intermediate_size=4096, hidden_size=1024, patch_size=14, image_size=336,
                              num_hidden_layers=24, num_attention_heads=16)  # LlavaConfig's CLIP defaults

# Old (transformers 4) file layout -> canonical names; applied in order, first match wins.
_RENAMES = (
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^vision_tower\."), "model.vision_tower."),
    (re.compile(r"^multi_modal_projector\."), "model.multi_modal_projector."),
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


@dataclass
class TextConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2 always)
    o_bias: bool
    mlp_bias: bool
    hidden_act: str
    sliding_window: int | None  # the engine caps max_model_len here, where windowed attention is still exact


@dataclass
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float


@dataclass
class Checkpoint:
    path: Path
    config: dict  # raw config.json
    architecture: str
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    vision_feature_layer: int | list[int]
    vision_feature_select_strategy: str  # "default" drops the CLS token, "full" keeps it
    projector_hidden_act: str
    projector_bias: bool
    tie_word_embeddings: bool
    dtype: torch.dtype
    device: torch.device
    eos_token_ids: list[int]
    bos_token_id: int | None
    tokenizer_path: Path  # tokenizer.json
    tokenizer_config: dict
    special_tokens: dict[str, str]  # bos_token, eos_token, ... as the chat template sees them
    chat_template: str | None
    preprocessor_config: dict
    weight_files: dict[str, tuple[Path, str]] = field(repr=False)  # canonical name -> (file, name in file)
    random_init: bool = False  # shape presets for profiling: weights drawn at load time, no files read
    _handles: dict = field(default_factory=dict, repr=False)

    def has(self, name: str) -> bool:
        return name in self.weight_files

    def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Read one weight (memory-mapped), check its shape, cast to the checkpoint dtype and device."""
        if self.random_init:
            return _random_weight(name, shape, self.dtype, self.device)
        if name not in self.weight_files:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the safetensors weights")
        file, key = self.weight_files[name]
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = _safe_open(file)
        t = handle.get_tensor(key)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{file.name}: tensor {key!r} has shape {tuple(t.shape)}, "
                                  f"expected {tuple(shape)} from config.json")
        return t.to(device=self.device, dtype=self.dtype)

    def close(self) -> None:
        self._handles.clear()


def _random_weight(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A stand-in weight with realistic scale: norms at 1, everything else N(0, 0.02)."""
    if "norm" in name and name.endswith(".weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02)


def _read_json(file: Path, required: bool = True) -> dict | None:
    if not file.is_file():
        if required:
            raise CheckpointError(f"{file.parent}: {file.name} not found")
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: malformed JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _safe_open(file: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e


def canonical_weight_name(name: str) -> str:
    for pattern, repl in _RENAMES:
        if pattern.match(name):
            name = pattern.sub(repl, name, count=1)
            break
    # transformers 4 kept CLIPVisionModel's inner `vision_model.` prefix; transformers 5 drops it.
    return name.replace("model.vision_tower.vision_model.", "model.vision_tower.", 1)


def _index_weights(path: Path) -> dict[str, tuple[Path, str]]:
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = _read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_file}: no 'weight_map' object")
        bad = sorted({repr(f) for f in weight_map.values() if not isinstance(f, str) or not f})
        if bad:
            raise CheckpointError(f"{index_file}: weight_map values must be file names, got {', '.join(bad)}")
        files = sorted(set(weight_map.values()))
        where = f"{index_file}: shard"
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        where = f"{path}: weight file"
    root = path.resolve()
    # A Hugging Face cache snapshot (models--org--name/snapshots/<rev>) links its files to ../../blobs/.
    roots = [root, root.parent.parent] if root.parent.name == "snapshots" else [root]
    for f in files:
        # A weight index (or a symlink) may not make us open files outside the checkpoint.
        target = (path / f).resolve()
        if Path(f).is_absolute() or ".." in Path(f).parts or not any(target.is_relative_to(r) for r in roots):
            raise CheckpointError(f"{where} {f!r} lies outside the checkpoint folder {path}; refusing to read it")
        if not target.is_file():
            raise CheckpointError(f"{where} {f!r} is listed but not present in {path}")
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{path}: only pickle weights found ({', '.join(pickles)}); cultengine loads safetensors "
                "only and never unpickles checkpoint files. Convert them to *.safetensors first.")
        raise CheckpointError(f"{path}: no *.safetensors weight files found")
    out: dict[str, tuple[Path, str]] = {}
    for f in files:
        for key in _safe_open(path / f).keys():
            out[canonical_weight_name(key)] = (path / f, key)
    return out


def _rope(cfg: dict, where: str) -> tuple[float, dict | None]:
    # transformers 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`.
    params = cfg.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or (params if params else None)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ("default", "linear"):
            raise CheckpointError(f"{where}: RoPE scaling {kind!r} is not supported (only default, linear)")
        if kind == "default":
            scaling = None
    return theta, scaling


def _text_config(cfg: dict, where: str) -> TextConfig:
    mt = cfg.get("model_type", "llama")
    if mt not in SUPPORTED_TEXT_MODELS:
        raise CheckpointError(f"{where}: text model_type {mt!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_TEXT_MODELS)})")
    c = {**_TEXT_DEFAULTS[mt], **{k: v for k, v in cfg.items() if v is not None}}
    heads = int(c["num_attention_heads"])
    theta, scaling = _rope(c, where)
    sliding = c.get("sliding_window") if (mt != "qwen2" or c.get("use_sliding_window")) else None
    return TextConfig(
        model_type=mt, vocab_size=int(c["vocab_size"]), hidden_size=int(c["hidden_size"]),
        intermediate_size=int(c["intermediate_size"]), num_layers=int(c["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=int(c.get("head_dim") or c["hidden_size"] // heads), rms_norm_eps=float(c["rms_norm_eps"]),
        rope_theta=theta, rope_scaling=scaling, max_position_embeddings=int(c["max_position_embeddings"]),
        attention_bias=True if mt == "qwen2" else bool(c.get("attention_bias", False)),
        o_bias=False if mt == "qwen2" else bool(c.get("attention_bias", False)),
        mlp_bias=bool(c.get("mlp_bias", False)), hidden_act=c["hidden_act"], sliding_window=sliding)


def _vision_config(cfg: dict, where: str) -> VisionConfig:
    mt = cfg.get("model_type", "clip_vision_model")
    if mt not in SUPPORTED_VISION_MODELS:
        raise CheckpointError(f"{where}: vision model_type {mt!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_VISION_MODELS)})")
    c = {**_VISION_DEFAULTS, **_VISION_LLAVA_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    return VisionConfig(
        hidden_size=int(c["hidden_size"]), intermediate_size=int(c["intermediate_size"]),
        num_layers=int(c["num_hidden_layers"]), num_heads=int(c["num_attention_heads"]),
        num_channels=int(c["num_channels"]), image_size=int(c["image_size"]), patch_size=int(c["patch_size"]),
        hidden_act=c["hidden_act"], layer_norm_eps=float(c["layer_norm_eps"]))


def _token_str(tok: Any) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as AddedToken dicts.
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


def _resolve_dtype(dtype: str | torch.dtype, config: dict) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    elif dtype == "auto":
        text = config.get("text_config") or {}
        name = (config.get("dtype") or config.get("torch_dtype") or text.get("dtype")
                or text.get("torch_dtype") or "float32")
    else:
        name = dtype
    if name not in _DTYPES:
        raise CheckpointError(f"unsupported dtype {name!r} (choose float32, bfloat16, float16 or auto)")
    return _DTYPES[name]


def load_checkpoint(path: str | Path, dtype: str | torch.dtype = "auto",
                    device: str | torch.device = "cpu", random_init: bool = False) -> Checkpoint:
    """Parse a local LLaVA checkpoint directory; weights are indexed now and read by `Checkpoint.tensor`.

    `random_init` needs only config and tokenizer files: weights are drawn instead of read (profiling
    real model shapes without downloading them).
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path} (pass a local directory, "
                              "e.g. one downloaded with `hf download`)")
    config = _read_json(path / "config.json")
    archs = config.get("architectures") or []
    arch = archs[0] if archs else config.get("model_type", "<none>")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{path / 'config.json'}: architecture {arch!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    where = str(path / "config.json")
    c = {**_LLAVA_DEFAULTS, **config}
    text_cfg = config.get("text_config") or {}
    text = _text_config(text_cfg, where)
    vision = _vision_config(config.get("vision_config") or {}, where)
    strategy = c["vision_feature_select_strategy"]
    if strategy not in ("default", "full"):
        raise CheckpointError(f"{where}: vision_feature_select_strategy {strategy!r} is not default/full")
    tie = bool(config.get("tie_word_embeddings") or text_cfg.get("tie_word_embeddings")
               or _TEXT_DEFAULTS[text.model_type]["tie_word_embeddings"])

    weights = {} if random_init else _index_weights(path)

    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise CheckpointError(f"{path}: tokenizer.json not found (cultengine needs a fast tokenizer file; "
                              "convert with transformers' PreTrainedTokenizerFast.save_pretrained)")
    tok_cfg = _read_json(path / "tokenizer_config.json", required=False) or {}
    special = {k: s for k in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                              "mask_token") if (s := _token_str(tok_cfg.get(k))) is not None}
    template = None
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    elif isinstance(tok_cfg.get("chat_template"), str):
        template = tok_cfg["chat_template"]
    elif isinstance(tok_cfg.get("chat_template"), list):  # named templates: take "default"
        named = {t.get("name"): t.get("template") for t in tok_cfg["chat_template"]}
        template = named.get("default")
    elif (path / "chat_template.json").is_file():
        template = (_read_json(path / "chat_template.json") or {}).get("chat_template")

    gen = _read_json(path / "generation_config.json", required=False) or {}
    eos = gen.get("eos_token_id", text_cfg.get("eos_token_id", config.get("eos_token_id")))
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else [])]
    bos = gen.get("bos_token_id", text_cfg.get("bos_token_id"))

    return Checkpoint(
        path=path, config=config, architecture=arch, text=text, vision=vision,
        image_token_id=int(config.get("image_token_index", config.get("image_token_id",
                                                                        c["image_token_index"]))),
        vision_feature_layer=c["vision_feature_layer"], vision_feature_select_strategy=strategy,
        projector_hidden_act=c["projector_hidden_act"], projector_bias=bool(c["multimodal_projector_bias"]),
        tie_word_embeddings=tie, dtype=_resolve_dtype(dtype, config), device=torch.device(device),
        eos_token_ids=eos_ids, bos_token_id=bos, tokenizer_path=tok_file, tokenizer_config=tok_cfg,
        special_tokens=special, chat_template=template,
        preprocessor_config=_read_json(path / "preprocessor_config.json", required=False) or {},
        weight_files=weights, random_init=random_init)
