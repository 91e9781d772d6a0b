"""Checkpoint loading: config files, safetensors weights, tokenizer/template/preprocessor paths.

Only `*.safetensors` weights are read (memory-mapped through `safe_open`); pickle files are never
unpickled and no code shipped with a checkpoint is ever executed. Weight names are normalised to the
transformers-5 in-memory layout (`model.language_model.*`, `model.vision_tower.*`,
`model.multi_modal_projector.*`, `lm_head.*`) whatever layout the files use.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import CheckpointError, unsupported_architecture
from .tokenizer_files import ChatTemplates, chat_templates, special_tokens, tokenizer_json

if TYPE_CHECKING:
    from .shards import TensorParallel

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}

# Old (transformers 4) file layout -> canonical names; applied in order, first match wins.
_RENAMES = (
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^vision_tower\."), "model.vision_tower."),
    (re.compile(r"^multi_modal_projector\."), "model.multi_modal_projector."),
    (re.compile(r"^image_newline$"), "model.image_newline"),
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class Checkpoint:
    """A checkpoint directory's files: raw config, tokenizer and template files, and its weights.

    What the config means is the model family's business (`cultengine.models`), not the loader's.
    """

    path: Path
    config: dict  # raw config.json
    architecture: str
    dtype: torch.dtype
    device: torch.device
    eos_token_ids: list[int]
    bos_token_id: int | None
    tokenizer_path: Path  # tokenizer.json (or, without one, the vocabulary it is converted from)
    tokenizer_json: str = field(repr=False)  # the tokenizer as transformers runs it (tokenizer_files.py)
    tokenizer_source: str  # "tokenizer.json as transformers 5.x's LlamaTokenizer loads it", "converted from ..."
    tokenizer_config: dict
    special_tokens: dict[str, str]  # bos_token, eos_token, ... as the chat template sees them
    templates: ChatTemplates | None  # the chat templates transformers renders with, and their file
    preprocessor_config: dict
    generation_config: dict  # generation_config.json (empty without one)
    weight_files: dict[str, tuple[Path, str]] = field(repr=False)  # canonical name -> (file, name in file)
    random_init: bool = False  # shape presets for profiling: weights drawn at load time, no files read
    # this process's rank among the tensor-parallel ones (parallel.TensorParallel); None: the whole model
    tensor_parallel: TensorParallel | None = field(default=None, repr=False)
    _handles: dict = field(default_factory=dict, repr=False)

    @property
    def chat_template(self) -> str | None:
        """The default chat template (None: the checkpoint has none)."""
        return None if self.templates is None else self.templates.pick(None)

    def tokenizer(self):
        """The Rust tokenizer of this checkpoint (one per checkpoint: families and the engine share it)."""
        tok = self._handles.get("tokenizer")
        if tok is None:
            from . import _core

            try:
                tok = self._handles["tokenizer"] = _core.Tokenizer.from_str(self.tokenizer_json)
            except ValueError as e:
                raise CheckpointError(f"{self.tokenizer_path}: {e}") from e
        return tok

    @property
    def preprocessor_file(self) -> Path:
        """The file `preprocessor_config` comes from (preprocessor_config.json, else processor_config.json)."""
        pre = self.path / "preprocessor_config.json"
        return pre if pre.is_file() else self.path / "processor_config.json"

    def has(self, name: str) -> bool:
        return name in self.weight_files

    def tensor(
        self, name: str, shape: tuple[int, ...] | None = None, part: tuple[int, int, int] | None = None
    ) -> torch.Tensor:
        """Read one weight (memory-mapped), check its shape, cast to the checkpoint dtype and device.

        `part` = (dim, start, length) reads only that slice along dim 0 or 1 (a tensor-parallel shard)."""
        if self.random_init:
            if part is not None:
                dim, _, length = part
                shape = tuple(length if d == dim else n for d, n in enumerate(shape))
            return _random_weight(name, shape, self.dtype, self.device)
        if name not in self.weight_files:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the safetensors weights")
        file, key = self.weight_files[name]
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = _safe_open(file)
        if part is None:
            t = handle.get_tensor(key)
            stored = tuple(t.shape)
        else:
            sliced = handle.get_slice(key)
            stored = tuple(sliced.get_shape())
        if shape is not None and stored != tuple(shape):
            raise CheckpointError(
                f"{file.name}: tensor {key!r} has shape {stored}, expected {tuple(shape)} from config.json"
            )
        if part is not None:
            dim, start, length = part
            t = sliced[start : start + length] if dim == 0 else sliced[:, start : start + length]
        t = t.to(device=self.device, dtype=self.dtype)
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(
                f"{file.name}: tensor {key!r} holds NaN or infinite values (a corrupt or "
                "badly converted checkpoint; in float16, a weight beyond its range)"
            )
        return t

    def close(self) -> None:
        self._handles = {k: v for k, v in self._handles.items() if k == "tokenizer"}


def _random_weight(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A stand-in weight with realistic scale: norms at 1, everything else N(0, 0.02)."""
    if "norm" in name and name.endswith(".weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02)


# config.json fields whose type every family relies on (numbers are checked where they are read, with
# config_int / config_float); a value of another type is an error naming the field, not a TypeError later.
_DICT_OR_NULL = ("text_config", "vision_config", "rope_scaling", "rope_parameters", "quantization_config")
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(_DICT_OR_NULL, (dict, type(None))),
    "architectures": (list, type(None)),
    "model_type": (str, type(None)),
    "dtype": (str, type(None)),
    "torch_dtype": (str, type(None)),
    "projector_hidden_act": (str, type(None)),
    "hidden_act": (str, type(None)),
    "hidden_activation": (str, type(None)),
    "tie_word_embeddings": (bool, type(None)),
    "image_token_index": (int, type(None)),
    "image_token_id": (int, type(None)),
    "vision_feature_layer": (int, list, type(None)),
    "vision_feature_select_strategy": (str, type(None)),
}


def _check_config_types(config: dict, file: Path, prefix: str = "") -> None:
    for key, types in _FIELD_TYPES.items():
        value = config.get(key)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise CheckpointError(f"{file}: {prefix}{key} must be {names}, got {value!r:.80}")
    if any(not isinstance(a, str) for a in config.get("architectures") or []):
        raise CheckpointError(
            f"{file}: {prefix}architectures must be a list of names, got {config['architectures']!r:.80}"
        )
    layer = config.get("vision_feature_layer")
    if isinstance(layer, list) and (not layer or any(isinstance(x, bool) or not isinstance(x, int) for x in layer)):
        raise CheckpointError(f"{file}: {prefix}vision_feature_layer must be a layer index or a non-empty list of them")
    for sub in ("text_config", "vision_config"):
        if isinstance(config.get(sub), dict):
            _check_config_types(config[sub], file, f"{prefix}{sub}.")


def _read_json(file: Path, required: bool = True) -> dict | None:
    if not file.is_file():
        if required:
            raise CheckpointError(f"{file.parent}: {file.name} not found")
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: malformed JSON ({e})") from e
    except RecursionError:
        raise CheckpointError(f"{file}: JSON nested too deeply to be a configuration file") from None
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


def _roots(path: Path) -> list[Path]:
    """The folders a checkpoint's files may resolve into."""
    root = path.resolve()
    # A Hugging Face cache snapshot (models--org--name/snapshots/<rev>) links its files to ../../blobs/.
    return [root, root.parent.parent] if root.parent.name == "snapshots" else [root]


def _check_files(path: Path) -> None:
    """Every file of the checkpoint folder (config, tokenizer, templates, processor and generation configs,
    as the weights) lies inside it and is a regular file: a symlink out of the folder could make us read any
    file, and a FIFO or device would block the read."""
    roots = _roots(path)
    templates = path / "additional_chat_templates"
    for f in [*path.iterdir(), *(templates.iterdir() if templates.is_dir() else ())]:
        if f.is_symlink() and not any(f.resolve().is_relative_to(r) for r in roots):
            raise CheckpointError(f"{f}: a link to {f.resolve()}, outside the checkpoint folder; refusing to read it")
        if f.exists() and not f.is_file() and not f.is_dir():
            raise CheckpointError(f"{f}: not a regular file (a FIFO, socket or device); refusing to read it")


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
    roots = _roots(path)
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
                "only and never unpickles checkpoint files. Convert them to *.safetensors first."
            )
        raise CheckpointError(f"{path}: no *.safetensors weight files found")
    out: dict[str, tuple[Path, str]] = {}
    for f in files:
        for key in _safe_open(path / f).keys():
            out[canonical_weight_name(key)] = (path / f, key)
    return out


def _image_processor_config(path: Path) -> dict:
    """preprocessor_config.json, or the `image_processor` part of processor_config.json (what transformers 5
    writes when a processor is saved whole)."""
    config = _read_json(path / "preprocessor_config.json", required=False)
    if config is None:
        config = (_read_json(path / "processor_config.json", required=False) or {}).get("image_processor")
    return config if isinstance(config, dict) else {}


def _token_ids(value: Any, file: str, path: Path) -> list[int]:
    """An `eos_token_id` entry (one id or a list) as ids; a float, string or negative id names its file."""
    values = value if isinstance(value, list) else [] if value is None else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise CheckpointError(f"{path / file}: eos_token_id must be a token id or a list of them, got {value!r}")
    return list(values)


def _resolve_dtype(dtype: str | torch.dtype, config: dict) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    elif dtype == "auto":
        text = config.get("text_config") or {}
        name = (
            config.get("dtype")
            or config.get("torch_dtype")
            or text.get("dtype")
            or text.get("torch_dtype")
            or "float32"
        )
    else:
        name = dtype
    if name not in _DTYPES:
        raise CheckpointError(f"unsupported dtype {name!r} (choose float32, bfloat16, float16 or auto)")
    return _DTYPES[name]


def load_checkpoint(
    path: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    random_init: bool = False,
    architectures: tuple[str, ...] | None = None,
) -> Checkpoint:
    """Parse a local checkpoint directory; weights are indexed now and read by `Checkpoint.tensor`.

    `random_init` needs only config and tokenizer files: weights are drawn instead of read (profiling
    real model shapes without downloading them). `architectures`, when given, are the ones the caller
    can run: any other is refused before a weight file is opened.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint directory not found: {path} (pass a local directory, e.g. one downloaded with `hf download`)"
        )
    _check_files(path)
    config = _read_json(path / "config.json")
    _check_config_types(config, path / "config.json")
    archs = config.get("architectures") or []
    arch = archs[0] if archs and isinstance(archs[0], str) else str(config.get("model_type", "<none>"))
    if architectures is not None and arch not in architectures:  # before any weight file is opened
        raise unsupported_architecture(str(path / "config.json"), arch, architectures)
    text_cfg = config.get("text_config") or {}
    weights = {} if random_init else _index_weights(path)

    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        tok_file = next((path / f for f in ("tokenizer.model", "vocab.json") if (path / f).is_file()), tok_file)
    tok_cfg = _read_json(path / "tokenizer_config.json", required=False) or {}
    special = special_tokens(path, tok_cfg)
    tok_text, tok_source = tokenizer_json(path, tok_cfg, special)
    has_processor = (path / "preprocessor_config.json").is_file() or (path / "processor_config.json").is_file()
    processor_cfg = (_read_json(path / "processor_config.json", required=False) or {}) if has_processor else None

    gen = _read_json(path / "generation_config.json", required=False) or {}
    eos = gen.get("eos_token_id", text_cfg.get("eos_token_id", config.get("eos_token_id")))
    eos_ids = _token_ids(eos, "generation_config.json" if "eos_token_id" in gen else "config.json", path)
    bos = gen.get("bos_token_id", text_cfg.get("bos_token_id"))

    return Checkpoint(
        path=path,
        config=config,
        architecture=arch,
        dtype=_resolve_dtype(dtype, config),
        device=torch.device(device),
        eos_token_ids=eos_ids,
        bos_token_id=bos,
        tokenizer_path=tok_file,
        tokenizer_json=tok_text,
        tokenizer_source=tok_source,
        tokenizer_config=tok_cfg,
        special_tokens=special,
        templates=chat_templates(path, tok_cfg, processor_cfg),
        preprocessor_config=_image_processor_config(path),
        generation_config=gen,
        weight_files=weights,
        random_init=random_init,
    )


@contextmanager
def config_errors(checkpoint):
    """A config field of a shape no check foresaw, met while a family reads the config: still an error
    naming the file, not a bare TypeError."""
    try:
        yield
    except (TypeError, KeyError, AttributeError, IndexError, RecursionError) as e:
        raise CheckpointError(
            f"{checkpoint.path / 'config.json'}: cannot be read as a {checkpoint.architecture} config "
            f"({type(e).__name__}: {e})"
        ) from e
