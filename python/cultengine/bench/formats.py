"""Shared readers of the published benchmark formats, and Hugging Face dataset folders -> data files.

The formats themselves are in `importers/`, one module each (the registry is `importers.NAMES`); here is what
they share: the import options (`--cvqa-lang`, `--columns`, `--image-root`...), the per-file `Source` an
importer reads a record against, image values, list and label cells, bilingual rows, options numbered in a
prompt. A record that cannot be mapped raises `rows.BadRow`, which the loader reports with its line and id and
skips.

Images named by URL are never fetched: `ImportOptions.image_root` names a folder where a URL's file name
(or the sha1/md5/sha256 hex digest of the URL, any extension) is looked up.

Folders (`expand`): a Hugging Face hub-cache snapshot (`owner/name` resolved offline under `HF_HUB_CACHE`
or `HF_HOME/hub`, layout `datasets--owner--name/snapshots/<rev>/`), a folder of parquet shards, or a
`datasets.save_to_disk` folder (`state.json` + Arrow IPC stream files; a `DatasetDict` has
`dataset_dict.json` and one such folder per split). `OWNER/NAME/sub/path` names a folder or file
inside the snapshot. All read with pyarrow; no dataset script runs.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from .rows import (
    LETTERS,
    BadRow,
    Row,
    _blank,
    _image,
    _text,
    split_options,
)

CANONICAL_FIELDS = (
    "id",
    "question",
    "options",
    "answer",
    "image",
    "hint",
    "country",
    "region",
    "continent",
    "category",
    "question_type",
    "language",
    "split",
)
DATA_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".tsv", ".csv")
# files of a dataset folder that describe it rather than hold rows
_NOT_DATA = {"dataset_info.json", "dataset_infos.json", "state.json", "dataset_dict.json", "config.json"}


@dataclass
class ImportOptions:
    """How the published formats are read (the `--cvqa-lang`, `--columns`, ... flags)."""

    lang: str = "local"  # local | en | both: which text of a bilingual benchmark is asked
    mc_prompt: str = "parsed"  # parsed | as-given: options out of the prompt, or the prompt verbatim
    open_answers: bool = False  # formats holding both: ask the open-ended question (the vqa suite)
    columns: dict[str, str] = field(default_factory=dict)  # canonical field -> the file's column(s)
    image_root: Path | None = None  # relative image paths resolve here; URL-named images are looked up here
    allow_outside_images: bool = False  # trust absolute paths and paths leading out of the dataset folder
    split: str | None = None

    @classmethod
    def from_args(cls, args: Any, open_answers: bool = False) -> ImportOptions:
        """From the parsed importer flags of `cultengine bench`/`data` (absent flags keep their defaults)."""
        root = getattr(args, "image_root", None)
        columns = cls.parse_columns(getattr(args, "columns", None))  # a ValueError: the CLI's error, exit 2
        return cls(
            lang=getattr(args, "cvqa_lang", None) or "local",
            mc_prompt=getattr(args, "mc_prompt", None) or "parsed",
            open_answers=open_answers,
            columns=columns,
            image_root=Path(root).expanduser() if root else None,
            allow_outside_images=bool(getattr(args, "allow_absolute_image_paths", False)),
            split=getattr(args, "split", None),
        )

    @classmethod
    def parse_columns(cls, spec: str | None) -> dict[str, str]:
        """'question=Q,options=A+B+C,answer=Label' -> {'question': 'Q', 'options': 'A+B+C', ...}."""
        out: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in (spec or "").split(","))):
            key, sep, col = part.partition("=")
            if not sep or key.strip() not in CANONICAL_FIELDS or not col.strip():
                raise ValueError(
                    f"--columns: {part!r} is not FIELD=COLUMN with FIELD one of {', '.join(CANONICAL_FIELDS)}"
                )
            out[key.strip()] = col.strip()
        return out


@dataclass
class Source:
    """The file an importer reads a record of: image paths resolve under `base`, ids default to `stem:line`;
    `memo` is the importer's own per-file state (VLMEvalKit's images stored once and named by row index)."""

    base: Path
    stem: str
    opts: ImportOptions
    memo: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------- images


class ImageRoot:
    """A local folder where images named by URL are looked up (by file name, or a hash of the URL)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._names: dict[str, Path] | None = None

    def _index(self) -> dict[str, Path]:
        if self._names is None:  # one walk, on first use
            self._names = {}
            for dirpath, _, files in os.walk(self.root):
                for f in files:
                    p = Path(dirpath, f)
                    self._names.setdefault(f, p)
                    self._names.setdefault(p.stem, p)
        return self._names

    def find(self, url: str) -> Path | None:
        names = self._index()
        name = unquote(Path(urlparse(url).path).name)
        digests = [getattr(hashlib, h)(url.encode()).hexdigest() for h in ("sha1", "md5", "sha256")]
        return next((names[k] for k in (name, *digests) if k and k in names), None)


def is_url(v: Any) -> bool:
    return isinstance(v, str) and re.match(r"^[a-z][a-z0-9+.-]*://", v.strip(), re.I) is not None


def image(v: Any, base: Path, opts: ImportOptions) -> str | bytes:
    """An image value (path, bytes, `{bytes, path}` struct, `data:` URI or URL) -> path or bytes."""
    if isinstance(v, dict) and v.get("bytes") is None and is_url(v.get("path")):
        v = v["path"]
    if is_url(v) and not v.startswith("data:"):
        if opts.image_root is None:
            raise BadRow(f"missing image {v}: images named by URL need --image-root (nothing is downloaded)")
        found = _image_root(Path(opts.image_root)).find(v.strip())
        if found is None:
            raise BadRow(f"missing image {v}: not found under --image-root {opts.image_root}")
        return str(found)
    return _image(v, base, False)


@cache
def _image_root(root: Path) -> ImageRoot:
    return ImageRoot(root)


def local_images(rec: dict, base: Path, opts: ImportOptions) -> dict:
    """A canonical record with the images it names by URL replaced by the files under `--image-root`."""
    for key in ("image", "images"):
        v = rec.get(key)
        if is_url(v) or (isinstance(v, list) and any(map(is_url, v))):
            rec = {**rec, key: [image(x, base, opts) for x in (v if isinstance(v, list) else [v])]}
    return rec


def _images(rec: dict, base: Path, opts: ImportOptions, *keys: str) -> list[str | bytes]:
    """The first non-blank image among the columns `keys`, or [] when the row has none."""
    for k in keys:
        v = rec.get(k)
        if isinstance(v, dict) and v.get("bytes") is None and _blank(v.get("path")):
            continue
        if not _blank(v):
            return [image(v, base, opts)]
    return []


# ------------------------------------------------------------------------------------- helpers


def _list(v: Any, name: str) -> list[str]:
    """A list column; a string holding a JSON or Python list is accepted, anything else is a bad row."""
    if _blank(v):
        return []
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            try:
                v = ast.literal_eval(v)
            except (ValueError, SyntaxError):
                raise BadRow(f"{name} is not a list: {v[:60]!r}") from None
    if not isinstance(v, list | tuple):
        raise BadRow(f"{name} is not a list ({type(v).__name__})")
    return [_text(o) for o in v]


def _label(v: Any, options: list[str]) -> int | None:
    """A 0-based option index; -1 or blank = unlabelled; anything out of range is a bad row."""
    if _blank(v):
        return None
    try:
        i = int(v)
    except (TypeError, ValueError):
        raise BadRow(f"Label {v!r} is not an integer") from None
    if i < 0:
        return None
    if i >= len(options):
        raise BadRow(f"Label {i} out of range for {len(options)} options")
    return i


def _bilingual(row: Row, opts: ImportOptions, english: dict[str, Any], local: dict[str, Any]) -> Row:
    """Fill the row from the local or English version; `both` keeps the English one for `split_languages`."""
    chosen = english if opts.lang == "en" else local
    for k, v in chosen.items():
        setattr(row, k, v)
    row.meta["prompt_lang"] = "en" if opts.lang == "en" else "local"
    if opts.lang == "both":
        row.meta["english"] = english
    return row


def split_languages(rows: list[Row]) -> list[Row]:
    """`lang="both"`: each bilingual row becomes `<id>|local` and `<id>|en` (the gap per country)."""
    out = []
    for r in rows:
        english = r.meta.pop("english", None)
        if english is None:
            out.append(r)
            continue
        r.meta["source_id"] = r.id
        en = Row(**{**r.__dict__, "meta": {**r.meta, "prompt_lang": "en"}})
        for k, v in english.items():
            setattr(en, k, v)
        r.id, en.id = f"{r.id}|local", f"{r.id}|en"
        out += [r, en]
    return out


_NUMBERED = re.compile(r"^\s*\(?(\d{1,2}|[A-Z])[.):]\s+(.+?)\s*$")


def numbered_options(prompt: str) -> tuple[str, list[str], list[str], str]:
    """Prompt with one option per line ("1. x" / "A) x") -> (question, labels, options, instruction after)."""
    lines = prompt.splitlines()
    for start, line in enumerate(lines):
        m = _NUMBERED.match(line)
        if not m or m.group(1) not in ("1", "A"):
            continue
        labels, options, end = [], [], start
        seq = [str(i) for i in range(1, 100)] if m.group(1) == "1" else list(LETTERS)
        while (
            end < len(lines)
            and len(labels) < len(seq)
            and (m := _NUMBERED.match(lines[end]))
            and m.group(1) == seq[len(labels)]
        ):
            labels.append(m.group(1))
            options.append(m.group(2))
            end += 1
        if len(options) >= 2:
            return "\n".join(lines[:start]).strip(), labels, options, "\n".join(lines[end:]).strip()
    return prompt, [], [], ""


def _mc_from_prompt(prompt: str, opts: ImportOptions, answer_label: str | None) -> tuple[str, list[str], Any, dict]:
    """(question, options, answer, meta) for a prompt that lists its own options."""
    question, labels, options, instruction = numbered_options(prompt)
    if not options:  # options inline: "Q? A. x B. y"
        question, options = split_options(prompt)
        labels, instruction = list(LETTERS[: len(options)]), ""
    if not options:
        raise BadRow("no numbered or lettered options found in the prompt")
    answer = next((seq.index(answer_label) for seq in (labels, options) if answer_label in seq), None)
    if answer_label is not None and answer is None:
        raise BadRow(f"answer {answer_label!r} not among the prompt's options {labels}")
    if opts.mc_prompt == "as-given":
        return prompt, labels, answer, {"prompt_as_given": True, "option_texts": options}
    return question, options, answer, {"instruction": instruction} if instruction else {}


def _place_meta(rec: dict, keys: tuple[str, ...]) -> dict:
    return {k: rec[k] for k in keys if k in rec and not _blank(rec[k]) and not isinstance(rec[k], bytes | dict)}


# ------------------------------------------------------------------------------------- files and folders


def json_records(data: Any) -> list:
    """A JSON file's rows: a list, `{"rows": [...]}`, or an object keyed by id (BLEnD's annotations)."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and isinstance(data.get("rows"), list):
        return data["rows"]
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        return [{"ID": k, **v} for k, v in data.items()]
    return []


def arrow_records(path: Path) -> Iterator[dict]:
    """Rows of an Arrow IPC file: the stream format `save_to_disk` writes, or the file format."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as src:
        try:
            reader = pa.ipc.open_stream(src)
        except pa.ArrowInvalid:
            src.seek(0)
            f = pa.ipc.open_file(src)
            batches = (f.get_batch(i) for i in range(f.num_record_batches))
        else:
            batches = iter(reader)
        for batch in batches:
            yield from batch.to_pylist()


def hub_cache() -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub resolves it (no network)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_snapshot(repo_id: str) -> Path | None:
    """`owner/name` -> its dataset snapshot in the local hub cache (refs/main's revision, else the newest)."""
    repo = hub_cache() / ("datasets--" + repo_id.replace("/", "--"))
    snaps = repo / "snapshots"
    if not snaps.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        rev = ref.read_text(errors="replace").strip()
        if not re.fullmatch(r"[\w.-]+", rev) or rev in (".", ".."):  # a revision names a folder of snapshots/
            raise ValueError(f"{ref}: {rev[:80]!r} is not a revision; refusing to follow it")
        if (snaps / rev).is_dir():
            return snaps / rev
    revs = sorted((p for p in snaps.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return revs[-1] if revs else None


def _split_of(path: Path, root: Path) -> set[str]:
    """Names a data file answers to as a split: its folder names and its shard prefix ("test-00000-of-...")."""
    parts = set(path.relative_to(root).parts[:-1])
    parts.add(re.split(r"[-.]", path.name, maxsplit=1)[0])
    return parts


def _inside(folder: Path, name, what: str) -> Path:
    """`folder / name` for a name a metadata file gives, refused unless it stays inside `folder`."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"{folder}: {what} {name!r} is not a name inside the folder; refusing to read it")
    return folder / name  # (a symlink inside the folder is its owner's choice, as hub snapshots link to blobs)


def _folder_files(folder: Path, split: str | None) -> list[Path]:
    if (folder / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk
        splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        chosen = [s for s in splits if split in (None, s)]
        if not chosen:
            raise FileNotFoundError(f"{folder}: no split {split!r} (splits: {', '.join(map(str, splits))})")
        return [f for s in chosen for f in _folder_files(_inside(folder, s, "dataset_dict.json split"), None)]
    if (folder / "state.json").is_file():  # Dataset.save_to_disk
        state = json.loads((folder / "state.json").read_text())
        return [_inside(folder, f["filename"], "state.json data file") for f in state["_data_files"]]
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in DATA_SUFFIXES
        and p.name not in _NOT_DATA
        and not any(x.startswith(".") for x in p.relative_to(folder).parts)
    )
    if split is not None:
        files = [p for p in files if split in _split_of(p, folder)]
    if not files:
        raise FileNotFoundError(
            f"{folder}: no data files ({', '.join(DATA_SUFFIXES)})" + (f" for split {split!r}" if split else "")
        )
    return files


def expand(paths: list[str | Path], split: str | None = None) -> list[Path]:
    """`--data` values -> data files: files as given, folders (hub snapshots, parquet shards, save_to_disk)
    expanded, and `owner/name` resolved offline from the local hub cache."""
    out: list[Path] = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists() and (m := re.fullmatch(r"([\w.-]+/[\w.-]+)(/.+)?", str(p))):
            snap = hub_snapshot(m.group(1))  # OWNER/NAME[/folder or file inside the snapshot]
            if snap and m.group(2) and ".." in Path(m.group(2)).parts:
                raise ValueError(f"{p}: a path inside a hub dataset may not contain '..'")
            path = snap / (m.group(2) or "/").lstrip("/") if snap else path
            if not path.exists():
                raise FileNotFoundError(
                    f"benchmark not found: {p} is neither a path nor a dataset in the "
                    f"hub cache {hub_cache()} (download it first; nothing is fetched)"
                )
        out += _folder_files(path, split) if path.is_dir() else [path]
    return out


def submissions(rows: list[Row], recs: list[dict]) -> dict[str, dict[str, int | None]]:
    """CVQA leaderboard files for unlabelled CVQA rows: file name -> {ID: predicted option index}."""
    by_id = {r["id"]: r for r in recs}
    out: dict[str, dict[str, int | None]] = {}
    for row in rows:
        rec = by_id.get(row.id)
        if row.meta.get("format") != "cvqa" or row.labeled or rec is None:
            continue
        lang = row.meta.get("prompt_lang", "local")
        sid = row.meta.get("source_id", row.id)
        out.setdefault(f"cvqa_submission_{lang}.json", {})[sid] = rec.get("pred_index")
    return out
