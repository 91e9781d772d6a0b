"""What transformers makes of a checkpoint's tokenizer and template files, so that a chat prompt here has
the token ids of `apply_chat_template(..., tokenize=True)` and a raw prompt those of `tokenizer(prompt)`.

The rules, as transformers 5 applies them:
- Templates. A processor (a checkpoint with preprocessor_config.json or processor_config.json, i.e. a VLM)
  renders with its own template: `chat_template` in processor_config.json, else chat_template.json
  (legacy), else chat_template.jinja plus additional_chat_templates/*.jinja. A tokenizer (text-only
  model) renders with chat_template.jinja (+ additional_chat_templates/) if present, else
  tokenizer_config.json's `chat_template` (one string or a list of named ones). Several templates: the
  one named "default" unless another is asked for by name.
- Special tokens. The named ones (bos_token, eos_token, ...) from tokenizer_config.json; where it has no
  `added_tokens_decoder` (an old layout), special_tokens_map.json fills the missing ones.
- BOS. Which special tokens an encoding adds is tokenizer.json's post-processor's choice:
  `add_bos_token` / `add_eos_token` in tokenizer_config.json count only where a vocabulary is converted
  (transformers drops them beside a tokenizer.json). A processor's `apply_chat_template(tokenize=True)` adds
  special tokens unless the rendered prompt already starts with the BOS token; a tokenizer's never does.
- The tokenizer: the one the installed transformers' `AutoTokenizer` builds. Which class it picks (config.json's
  model type, tokenizer_config.json's `tokenizer_class`, its own corrections) decides whether tokenizer.json is
  used as saved (the generic TokenizersBackend) or rebuilt (LlamaTokenizer, GemmaTokenizer, ... keep the file's
  vocabulary, merges and post-processor and build their own pre-tokenizer and decoder). A checkpoint with no
  tokenizer.json but a SentencePiece `tokenizer.model` (or `vocab.json` + `merges.txt`) is converted with
  transformers' converter. Cached by content and transformers' version under ~/.cache/cultengine/tokenizers.
  Without transformers: tokenizer.json as saved.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError

NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TEMPLATE_DIR = "additional_chat_templates"
_SLOW_VOCAB_FILES = ("tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class ChatTemplates:
    """The named templates of one side (processor or tokenizer) and the file they come from."""

    named: dict[str, str]  # name -> Jinja source; "default" when there is one
    source: str  # e.g. "chat_template.json", "tokenizer_config.json"
    processor: bool  # rendered as a processor renders (the BOS rule), else as a tokenizer does

    def pick(self, name: str | None) -> str:
        """The template called `name` (None: "default", or the only one)."""
        if name is None:
            if "default" in self.named:
                return self.named["default"]
            if len(self.named) == 1:
                return next(iter(self.named.values()))
            raise CheckpointError(
                f"{self.source} holds several chat templates and none is named 'default' "
                f"({', '.join(sorted(self.named))}); choose one with Engine(chat_template=NAME)"
            )
        if name not in self.named:
            raise CheckpointError(
                f"{self.source} has no chat template named {name!r} (it has: {', '.join(sorted(self.named))})"
            )
        return self.named[name]


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file}: not UTF-8 text ({e})") from e


def _jinja_templates(path: Path) -> dict[str, str]:
    """chat_template.jinja as "default", and additional_chat_templates/NAME.jinja by name."""
    named = {}
    if (path / "chat_template.jinja").is_file():
        named["default"] = _read_text(path / "chat_template.jinja")
    extra = path / TEMPLATE_DIR
    if extra.is_dir():
        for f in sorted(extra.glob("*.jinja")):
            named[f.stem] = _read_text(f)
    return named


def _template_value(value, where: str) -> dict[str, str] | None:
    """A `chat_template` entry: a string, or a list of {"name", "template"} (transformers' named form)."""
    if value is None:
        return None
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in value
    ):
        return {t["name"]: t["template"] for t in value}
    raise CheckpointError(f"{where}: 'chat_template' must be a string or a list of {{name, template}} objects")


def processor_templates(path: Path, processor_config: dict) -> ChatTemplates | None:
    named = _template_value(processor_config.get("chat_template"), str(path / "processor_config.json"))
    if named:
        return ChatTemplates(named, "processor_config.json", processor=True)
    legacy = path / "chat_template.json"
    if legacy.is_file():
        try:
            data = json.loads(_read_text(legacy))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{legacy}: malformed JSON ({e})") from e
        if not isinstance(data, dict) or not isinstance(data.get("chat_template"), str):
            raise CheckpointError(f"{legacy}: expected an object with a 'chat_template' string")
        if (path / TEMPLATE_DIR).is_dir():  # transformers refuses this mix too
            raise CheckpointError(
                f"{legacy}: a legacy chat_template.json beside {TEMPLATE_DIR}/ is not supported "
                "(replace it with chat_template.jinja)"
            )
        return ChatTemplates({"default": data["chat_template"]}, "chat_template.json", processor=True)
    named = _jinja_templates(path)
    return ChatTemplates(named, "chat_template.jinja", processor=True) if named else None


def tokenizer_templates(path: Path, tokenizer_config: dict) -> ChatTemplates | None:
    named = _jinja_templates(path)
    if named:
        return ChatTemplates(named, "chat_template.jinja", processor=False)
    named = _template_value(tokenizer_config.get("chat_template"), str(path / "tokenizer_config.json"))
    return ChatTemplates(named, "tokenizer_config.json", processor=False) if named else None


def chat_templates(path: Path, tokenizer_config: dict, processor_config: dict | None) -> ChatTemplates | None:
    """The templates transformers renders with: the processor's for a checkpoint with a processor (falling
    back to the tokenizer's where the processor has none), else the tokenizer's."""
    if processor_config is None:
        return tokenizer_templates(path, tokenizer_config)
    found = processor_templates(path, processor_config)
    if found is None and (fallback := tokenizer_templates(path, tokenizer_config)) is not None:
        # transformers' processor would refuse; rendering the tokenizer's template (flagged in the source) is
        # what a user of such a checkpoint does by hand.
        found = ChatTemplates(fallback.named, f"{fallback.source} (the processor has none)", processor=True)
    return found


def _token_str(tok) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as AddedToken dicts.
    if isinstance(tok, dict):
        tok = tok.get("content")
    return tok if isinstance(tok, str) else None


def special_tokens(path: Path, tokenizer_config: dict) -> dict[str, str]:
    """The named special tokens a chat template sees (bos_token, eos_token, ...)."""
    found = {k: s for k in NAMED_SPECIAL_TOKENS if (s := _token_str(tokenizer_config.get(k))) is not None}
    legacy = path / "special_tokens_map.json"
    if "added_tokens_decoder" not in tokenizer_config and legacy.is_file():
        try:
            extra = json.loads(_read_text(legacy))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{legacy}: malformed JSON ({e})") from e
        if isinstance(extra, dict):
            for k in NAMED_SPECIAL_TOKENS:
                if k not in found and (s := _token_str(extra.get(k))) is not None:
                    found[k] = s
    return found


def chat_adds_special_tokens(prompt: str, templates: ChatTemplates, special: dict[str, str]) -> bool:
    """Whether a rendered chat prompt is encoded with the tokenizer's special tokens (BOS) added."""
    if not templates.processor:
        return False
    bos = special.get("bos_token")
    return not (bos is not None and prompt.startswith(bos))


def tokenizer_json(path: Path, tokenizer_config: dict, special: dict[str, str]) -> tuple[str, str]:
    """(tokenizer.json text as transformers would run it, what it was made from).

    Where transformers is installed, the tokenizer its `AutoTokenizer` builds: which class it picks (from
    config.json's model type, tokenizer_config.json's `tokenizer_class` and its own corrections) decides
    whether tokenizer.json is used as saved or rebuilt (a model's own class keeps the file's vocabulary, merges
    and post-processor and builds its normalizer, pre-tokenizer and decoder its own way). Without transformers,
    tokenizer.json as saved, with the tokens tokenizer_config.json adds."""
    file = path / "tokenizer.json"
    if not file.is_file():
        vocab = next((f for f in _SLOW_VOCAB_FILES if (path / f).is_file()), None)
        if vocab is None:
            raise CheckpointError(
                f"{path}: tokenizer.json not found, and no tokenizer.model or vocab.json to build it from "
                "(cultengine needs the checkpoint's tokenizer files)"
            )
        text, _ = _as_transformers_loads(path, f"no tokenizer.json; building it from {vocab}", required=True)
        return text, f"converted from {vocab}"
    loaded = _as_transformers_loads(path, "tokenizer.json", required=False)
    if loaded is None:
        return _follow_config(_read_text(file), tokenizer_config, special, file), "tokenizer.json as saved"
    text, how = loaded
    return text, f"tokenizer.json as {how} loads it"


def _follow_config(text: str, config: dict, special: dict[str, str], file: Path) -> str:
    """`text` with the tokens tokenizer_config.json declares (added_tokens_decoder) or names that tokenizer.json
    lacks, as transformers adds them (unchanged text where there are none). Its `add_bos_token` /
    `add_eos_token` change nothing here: transformers drops them when a tokenizer.json exists, whose
    post-processor decides; a converted vocabulary already carries them."""
    from tokenizers import AddedToken, Tokenizer

    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # the tokenizers library raises plain Exceptions for a bad file
        raise CheckpointError(f"{file}: not a readable tokenizer file ({e})") from e
    vocab = tok.get_vocab(with_added_tokens=True)
    missing = []
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for _, t in sorted(decoder.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0):
            if isinstance(t, dict) and isinstance(t.get("content"), str) and t["content"] not in vocab:
                missing.append(
                    AddedToken(
                        t["content"],
                        single_word=bool(t.get("single_word", False)),
                        lstrip=bool(t.get("lstrip", False)),
                        rstrip=bool(t.get("rstrip", False)),
                        normalized=bool(t.get("normalized", False)),
                        special=bool(t.get("special", True)),
                    )
                )
    for s in special.values():
        if s not in vocab and all(str(m.content) != s for m in missing):
            missing.append(AddedToken(s, special=True, normalized=False))
    if not missing:
        return text
    tok.add_tokens(missing)
    return tok.to_str()


def _as_transformers_loads(path: Path, why: str, required: bool) -> tuple[str, str] | None:
    """(tokenizer.json text of the tokenizer transformers' `AutoTokenizer` builds from the checkpoint's files,
    "transformers <version>'s <class>"), cached by the files' content and transformers' version. Without
    transformers, or where it cannot load them: a CheckpointError if `required`, else None (with a warning
    where it failed)."""
    names = (*_SLOW_VOCAB_FILES, "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    try:
        import transformers
        from transformers import AutoTokenizer
    except ImportError as e:
        if not required:
            return None
        raise CheckpointError(
            f"{path}: {why}, which needs transformers (pip install transformers sentencepiece protobuf), or save "
            "the tokenizer with transformers' save_pretrained to write tokenizer.json"
        ) from e
    digest = hashlib.sha256(transformers.__version__.encode())
    for f in (*names, "config.json"):  # config.json: its model type can pick the tokenizer class
        if (path / f).is_file():
            digest.update(f.encode() + b"\0" + (path / f).read_bytes())
    cache = Path(os.environ.get("CULTENGINE_CACHE", Path.home() / ".cache" / "cultengine")) / "tokenizers"
    cached = cache / f"{digest.hexdigest()[:32]}.json"
    if cached.is_file():
        try:
            entry = json.loads(cached.read_text(encoding="utf-8"))
            return entry["tokenizer"], entry["loaded_by"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache entry: load again
    try:  # no remote code: only transformers' own tokenizer classes
        hf = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
        text = hf.backend_tokenizer.to_str()
    except Exception as e:  # noqa: BLE001 - whatever transformers raises names the checkpoint
        if not required:
            warnings.warn(
                f"{path}: transformers could not load the tokenizer ({type(e).__name__}: {e}); using tokenizer.json "
                "as saved, which transformers may encode differently",
                stacklevel=3,
            )
            return None
        raise CheckpointError(
            f"{path}: {why}, and transformers could not load it ({type(e).__name__}: {e}); for a tokenizer.model, "
            "sentencepiece and protobuf may be missing (pip install sentencepiece protobuf)"
        ) from e
    loaded_by = f"transformers {transformers.__version__}'s {type(hf).__name__}"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"loaded_by": loaded_by, "tokenizer": text}), encoding="utf-8")
        tmp.replace(cached)
    except OSError:
        pass  # a read-only home: no cache, the next load converts again
    return text, loaded_by
