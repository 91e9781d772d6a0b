"""Benchmark files -> canonical rows; bad rows are reported with their line and id, never fatal.

Canonical row (README.md, "Benchmark files"): `id, images[], question, options[], answer, country, region,
continent, category, question_type, language, split` plus `hint`; other columns are kept in `meta`.
`answer` is normalised to an option index for multiple choice, to a list of accepted texts for open
questions, or None when the file carries no label (predictions are then written for submission only).

Importers (picked by `--format`, else by extension and columns); text files are read as UTF-8 with or
without a byte-order mark:

- canonical (.jsonl / .json / .parquet): the canonical names; `image` (one) or `images` (list), each a
  path relative to the file, `{"bytes": ...}` (raw bytes, or base64 in JSON) or a `data:` URI. `options`
  is a list of strings, or in a text cell (CSV, TSV) a JSON list or options separated by `|`; without an
  `options` column, one column per option (`A`, `B`, ... as VLMEvalKit writes them, or `option_a`, `option_1`,
  `choice_a`, ...; trailing blank cells mean fewer options). `answer` a letter, an option index (an integer)
  or an option's text. A file whose first row has no `question` is refused, naming its columns.
- vlmeval (.tsv): `index`->id, `image` (base64; a bare index refers to that row's image), `image_path`,
  `question`, `hint`, option columns `A`..`Z`, `answer` (letter), `category`, `l2-category`->question_type,
  and `country`, `language` when present.
- cvqa, almbench, worldcuisines, seavqa, blend, culturalvqa (published schemas) and columns (`--columns`
  maps any table): in `formats.py`, which also expands folders (Hugging Face hub snapshots, parquet
  shards, `save_to_disk`) and `OWNER/NAME` from the local hub cache.

Country -> region/continent comes from `countries.csv` when the file gives only a country.

Image paths stay inside the dataset: a relative path resolves under the data file's folder (or the
import options' `image_root`) and may not lead out of it, through `..`, a symlink or an absolute path
(a Hugging Face hub snapshot's own `blobs/` count as inside: its files are links there).
`allow_outside_images=True` (`--allow-absolute-image-paths`) trusts the file's paths instead. A refused
path makes its row a skipped row, and nothing outside is opened.
"""

from __future__ import annotations

import ast
import base64
import binascii
import hashlib
import io
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from .. import datafiles
from ..image import check_image_size
from . import countries

if TYPE_CHECKING:
    from . import formats

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
GROUP_KEYS = ("country", "region", "continent", "category", "question_type", "language")
KNOWN_FORMATS = (
    "canonical JSONL/JSON/parquet/CSV, VLMEvalKit TSV, CVQA/ALM-Bench/CulturalVQA parquet, ALM-Bench/CulturalVQA "
    "JSONL, WorldCuisines, SEA-VQA CSV, BLEnD JSON, any table with --columns"
)
OPTION_SEPARATOR = "|"  # a text cell holding several options: "Japan|Peru|Ghana|India"
# One column per option: A, B, C... (VLMEvalKit) or option_a / option_1 / choice_a ... (in order, from the first)
_OPTION_COLUMN = re.compile(r"^(?:(?:option|choice)[ _-]?([a-z]|\d{1,2})|([A-Z]))$", re.I)


@dataclass
class Row:
    id: str
    question: str
    images: list[str | bytes] = field(default_factory=list)  # absolute paths or encoded image bytes
    options: list[str] = field(default_factory=list)
    answer: int | list[str] | None = None
    hint: str = ""
    country: str = ""
    region: str = ""
    continent: str = ""
    category: str = ""
    question_type: str = ""
    language: str = ""
    split: str = ""
    western: bool | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    line: int = 0  # where the row came from, for error messages

    @property
    def labeled(self) -> bool:
        return self.answer is not None

    def groups(self) -> dict[str, str]:
        return {k: getattr(self, k) for k in GROUP_KEYS}

    def image_key(self) -> str:
        """Identity of the images, so requests sharing an image can be ordered next to each other."""
        h = hashlib.sha1()
        for im in self.images:
            h.update(im if isinstance(im, bytes) else str(im).encode())
        return h.hexdigest() if self.images else ""


class BadRow(ValueError):
    pass


@dataclass
class Skipped:
    file: str
    line: int  # 1-based line (JSONL/TSV) or row number (parquet)
    id: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} id={self.id or '?'}: {self.reason}"


@dataclass
class Dataset:
    rows: list[Row]
    skipped: list[Skipped]
    files: list[str]
    # per file: (column, how it was read), in the file's column order (`data validate` prints it)
    columns: dict[str, list[tuple[str, str]]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- reading


def _records(path: Path, fmt: str) -> Iterator[tuple[int, dict | Exception]]:
    """(line number, record or the error that made the line unreadable)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for i, rec in enumerate(table.to_pylist(), 1):
            yield i, rec
    elif suffix in (".tsv", ".csv"):
        for i, rec in datafiles.csv_rows(path, "\t" if suffix == ".tsv" else ","):
            yield i, BadRow(str(rec)) if isinstance(rec, datafiles.BadLine) else rec
    elif suffix == ".arrow":
        from . import formats

        yield from enumerate(formats.arrow_records(path), 1)
    elif suffix == ".json":
        from . import formats

        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: not valid JSON ({e.msg} at line {e.lineno}); expected a list of row "
                f"objects. Readable formats: {KNOWN_FORMATS}"
            ) from None
        rows = formats.json_records(data)
        if not rows:
            raise ValueError(
                f'{path}: a .json benchmark file holds a list of row objects, {{"rows": [...]}} or '
                f"an object of row objects keyed by id; got {type(data).__name__}"
            )
        for i, rec in enumerate(rows, 1):
            yield i, rec if isinstance(rec, dict) else BadRow("row is not a JSON object")
    else:  # JSONL
        for i, rec in datafiles.json_lines(path):
            yield i, BadRow(str(rec)) if isinstance(rec, datafiles.BadLine) else rec


def detect_format(path: Path, first: dict | None) -> str:
    from . import formats

    return formats.detect(set(first or ())) or ("vlmeval" if path.suffix.lower() == ".tsv" else "canonical")


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip())


def _text(v: Any) -> str:
    return "" if _blank(v) else str(v).strip()


def _image(v: Any, base: Path, b64: bool) -> str | bytes:
    """A path (resolved against the data file's folder) or encoded image bytes."""
    if isinstance(v, dict):
        if v.get("bytes") is not None:
            return _image(v["bytes"], base, True)
        v = v.get("path")
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v)
    if not isinstance(v, str) or not v:
        raise BadRow("missing image")
    if v.startswith("data:"):
        v, b64 = v.split(",", 1)[-1], True
    if b64:
        try:
            return base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadRow("image is not valid base64") from e
    try:  # a NUL byte, an over-long name or a symlink loop: this row's error, not the file's
        return str((base / v).resolve())
    except (OSError, ValueError, RuntimeError) as e:
        raise BadRow(f"image {v[:200]!r} is not a usable file name: {'NUL byte' if chr(0) in v else e}") from None


def check_image(im: str | bytes) -> None:
    try:
        with Image.open(io.BytesIO(im) if isinstance(im, bytes) else im) as f:
            check_image_size(f.size, f"<{len(im)} bytes>" if isinstance(im, bytes) else im)
            f.verify()
    except FileNotFoundError as e:
        raise BadRow(f"missing image {im}") from e
    except Exception as e:  # PIL raises many types for broken files
        raise BadRow(f"unreadable image: {type(e).__name__}: {e}") from e


def _answer(raw: Any, options: list[str]) -> int | list[str] | None:
    """A letter, an index or the option text -> index (MCQ); text or list of texts -> list (open)."""
    if isinstance(raw, bool) or (isinstance(raw, list | tuple) and any(isinstance(a, bool) for a in raw)):
        raise BadRow(f"answer {raw!r} is a boolean; give the option's letter, index or text")
    if _blank(raw) or (isinstance(raw, int | float) and raw < 0):
        return None
    if not options:
        return [_text(a) for a in raw] if isinstance(raw, list | tuple) else [_text(raw)]
    if isinstance(raw, float) and not raw.is_integer():
        raise BadRow(f"answer {raw!r} is not an option index (a whole number)")
    if isinstance(raw, int | float):
        if int(raw) < len(options):
            return int(raw)
        raise BadRow(f"answer index {raw} not among {len(options)} options")
    s = _text(raw)
    if s in options:  # an option's own text wins over reading it as a letter or index
        return options.index(s)
    if len(s) == 1 and s.upper() in LETTERS[: len(options)]:
        return LETTERS.index(s.upper())
    if s.isdigit() and int(s) < len(options):
        return int(s)
    raise BadRow(f"answer {s!r} not among options {options}")


def _place(row: Row) -> Row:
    """Fill region/continent/western from the country table when the file gives only a country."""
    c = countries.lookup(row.country)
    if c:
        row.country = c.name
        row.region = row.region or c.region
        row.continent = row.continent or c.continent
        row.western = c.western
    return row


def _options(raw: Any, column: str = "options") -> list[str]:
    """A list of option texts (numbers are written out). A text cell is read as a JSON (or Python) list when it
    looks like one, else split on `OPTION_SEPARATOR`; anything else is a bad row."""
    if _blank(raw):
        return []
    if isinstance(raw, str):
        raw = _options_text(raw, column)
    if not isinstance(raw, list | tuple) or any(
        isinstance(o, bool) or not isinstance(o, str | int | float) for o in raw
    ):
        raise BadRow(
            f"{column} must be a list of strings (a JSON list, options separated by '{OPTION_SEPARATOR}', or "
            f"one column per option: A, B, C... or option_a, option_b...), got {raw!r:.60}"
        )
    options = [_text(o) for o in raw]
    if "" in options:
        raise BadRow(f"{column} has an empty option (option {options.index('') + 1})")
    return options


def _options_text(text: str, column: str) -> Any:
    """A text cell of options: '["a", "b"]' (JSON or Python list) or 'a|b'; a single text is returned as is."""
    s = text.strip()
    if s.startswith("["):
        try:
            return json.loads(s)
        except ValueError:
            try:
                return ast.literal_eval(s)
            except (ValueError, SyntaxError):
                raise BadRow(f"{column} looks like a list but is not valid JSON: {s[:60]!r}") from None
    if OPTION_SEPARATOR in s:
        return [o.strip() for o in s.split(OPTION_SEPARATOR)]
    return text


def options_spelling(raw: Any) -> str | None:
    """How an options value is written (for `data validate`), None when blank."""
    if _blank(raw):
        return None
    if isinstance(raw, list | tuple):
        return "a list"
    if isinstance(raw, str) and raw.strip().startswith("["):
        return "a JSON list in text"
    if isinstance(raw, str) and OPTION_SEPARATOR in raw:
        return f"options separated by '{OPTION_SEPARATOR}'"
    return f"{type(raw).__name__} (not options)"


def option_columns(columns) -> list[str]:
    """The one-column-per-option columns among `columns`, in option order: A, B, C... or option_a, option_b...
    (option_1, choice_a, ...), consecutive from the first; [] when there are fewer than two."""
    found: dict[str, dict[int, str]] = {}
    for col in columns:
        m = _OPTION_COLUMN.match(str(col))
        if not m:
            continue
        key = m.group(1) or m.group(2)
        if m.group(2) and not (col.isupper() and len(col) == 1):
            continue  # a bare letter only in upper case (VLMEvalKit's A, B, ...)
        kind = str(col)[: m.start(1)].lower() if m.group(1) else ""
        if key.isdigit():
            index, kind = int(key), kind + "#"
        else:
            index = LETTERS.index(key.upper())
        found.setdefault(kind, {})[index] = col
    best: list[str] = []
    for indices in found.values():
        start = 0 if 0 in indices else 1 if 1 in indices else None
        run = []
        while start is not None and start + len(run) in indices:
            run.append(indices[start + len(run)])
        if len(run) > len(best):
            best = run
    return best if len(best) >= 2 else []


def _option_cells(rec: dict, columns: list[str]) -> list[str]:
    """Options from one column each; trailing blank cells are fewer options, a blank between two is a bad row."""
    values = [rec.get(c) for c in columns]
    while values and _blank(values[-1]):
        values.pop()
    if any(_blank(v) for v in values):
        gap = next(c for c, v in zip(columns, values, strict=False) if _blank(v))
        raise BadRow(f"option column {gap} is empty but a later option column is not")
    return _options(values, "option columns " + ", ".join(columns[: len(values)]))


def _canonical(rec: dict, base: Path, line: int, stem: str) -> Row:
    imgs = rec.get("images", rec.get("image"))
    imgs = [] if _blank(imgs) else imgs if isinstance(imgs, list) else [imgs]
    cells = [] if "options" in rec else option_columns(rec)
    options = _option_cells(rec, cells) if cells else _options(rec.get("options"))
    known = {"id", "image", "images", "question", "options", "answer", "answers", "hint", *Row.__dataclass_fields__}
    known.update(cells)
    return Row(
        id=_text(rec.get("id")) or f"{stem}:{line}",
        question=_text(rec.get("question")),
        images=[_image(i, base, False) for i in imgs],
        options=options,
        answer=_answer(rec.get("answer") if not _blank(rec.get("answer")) else rec.get("answers"), options),
        hint=_text(rec.get("hint")),
        **{
            k: _text(rec.get(k))
            for k in ("country", "region", "continent", "category", "question_type", "language", "split")
        },
        meta=_meta(rec, known),
    )


def _meta(rec: dict, known: set[str]) -> dict:
    meta = {k: v for k, v in rec.items() if k not in known and k != "meta" and not isinstance(v, bytes)}
    extra = rec.get("meta")  # parquet written by `write` keeps metadata as one JSON column
    if isinstance(extra, str) and extra.startswith("{"):
        meta.update(json.loads(extra))
    elif isinstance(extra, dict):
        meta.update(extra)
    return meta


def _vlmeval(rec: dict, base: Path, line: int, stem: str, by_index: dict[str, str]) -> Row:
    idx = _text(rec.get("index")) or str(line)
    img = _text(rec.get("image"))
    if img:
        if len(img) < 64 and img in by_index:  # VLMEvalKit stores a repeated image once
            img = by_index[img]
        by_index.setdefault(idx, img)
        images = [_image(img, base, True)]
    elif _text(rec.get("image_path")):
        images = [_image(_text(rec["image_path"]), base, False)]
    else:
        images = []
    options = []
    for letter in LETTERS:
        if letter not in rec or _blank(rec[letter]):
            break
        options.append(_text(rec[letter]))
    return Row(
        id=idx,
        question=_text(rec.get("question")),
        images=images,
        options=options,
        answer=_answer(rec.get("answer"), options),
        hint=_text(rec.get("hint")),
        country=_text(rec.get("country")),
        language=_text(rec.get("language")),
        category=_text(rec.get("category")),
        question_type=_text(rec.get("l2-category")),
        split=_text(rec.get("split")),
    )


def parse_subset(subset: str) -> tuple[str, str]:
    """CVQA `Subset` -> (country, language): "('Japanese', 'Japan')" or "Japan-Japanese"."""
    s = subset.strip()
    if s.startswith("("):
        try:
            lang, country = ast.literal_eval(s)
            return str(country), str(lang)
        except (ValueError, SyntaxError):
            pass
    parts = [p.strip() for p in re.split(r"[-_]", s.strip("()")) if p.strip()]
    for demonyms in (False, True):  # prefer a part that is a country's name over a demonym
        for i, p in enumerate(parts):
            if countries.lookup(p, demonyms=demonyms):
                return p, "-".join(parts[:i] + parts[i + 1 :])
    return "", s


_OPTION_RE = re.compile(r"(?:^|\s|\n)\(?([A-H])[.)]\s+(.+?)(?=\s+\(?[A-H][.)]\s+|\n|$)", re.S)


def split_options(text: str) -> tuple[str, list[str]]:
    """ "Q? A. x B. y" or lines "(A) x" -> ("Q?", [x, y]); no lettered options -> (text, [])."""
    found = list(_OPTION_RE.finditer(text))
    letters = "".join(m.group(1) for m in found)
    if len(found) < 2 or not LETTERS.startswith(letters):
        return text, []
    question = re.sub(r"\s*(Options|Choices)\s*:?\s*$", "", text[: found[0].start()].strip(), flags=re.I)
    return question, [m.group(2).strip() for m in found]


def _confinement_root(base: Path) -> Path:
    """The folder images may not leave: `base`, or the hub-cache dataset folder holding its snapshot (whose
    files link into that folder's `blobs/`)."""
    root = base.resolve()
    for parent in (base, *base.parents):
        if parent.name.startswith("datasets--") and (parent / "snapshots").is_dir():
            return parent.resolve()
    return root


def load_file(
    path: str | Path, fmt: str = "auto", verify_images: bool = True, opts: formats.ImportOptions | None = None
) -> Dataset:
    """Rows of one benchmark file; a file with no readable row at all is a ValueError naming the formats.
    `opts`: a `formats.ImportOptions` (language, column map, image root, trust in outside image paths)."""
    from . import formats  # imports this module: loaded lazily

    opts = opts or formats.ImportOptions()
    if opts.columns and fmt == "auto":
        fmt = "columns"
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    if not path.is_file():
        raise ValueError(f"benchmark file {path} is not a file")
    base, stem = opts.image_root or path.parent, path.stem
    rows, skipped, seen = [], [], set()
    by_index: dict[str, str] = {}
    root = _confinement_root(base)
    keys: dict[str, None] = {}  # every column (key) seen, in order
    spellings: Counter[str] = Counter()  # how the options column is written
    for line, rec in _records(path, fmt):
        rid = ""
        try:
            if isinstance(rec, Exception):
                raise rec
            if fmt == "auto":
                fmt = detect_format(path, rec)
            if not keys and fmt == "canonical" and "question" not in rec:
                raise ValueError(
                    f"{path}: no question column (columns: {', '.join(map(str, rec)) or 'none'}); name the column "
                    "holding the questions `question`, or map it with --columns question=COLUMN"
                )
            keys.update(dict.fromkeys(map(str, rec)))
            how = options_spelling(rec.get(opts.columns.get("options", "options")))
            if how and fmt in ("canonical", "columns"):
                spellings[how] += 1
            rid = formats.record_id(rec, opts)
            if fmt == "vlmeval":
                row = _vlmeval(rec, base, line, stem, by_index)
            elif fmt == "canonical":
                row = _canonical(formats.local_images(rec, base, opts), base, line, stem)
            else:
                row = formats.IMPORTERS[fmt](rec, base, line, stem, opts)
            rid = row.id
            if not row.question:
                raise BadRow("empty question")
            if row.id in seen:
                raise BadRow("duplicate id")
            for im in row.images:  # checked before any image is opened
                if isinstance(im, str) and not opts.allow_outside_images and not Path(im).is_relative_to(root):
                    raise BadRow(
                        f"image {im} is outside the dataset folder {root}: absolute paths and paths "
                        "leading out (.., symlinks) need --allow-absolute-image-paths (or --image-root)"
                    )
            if verify_images:
                for im in row.images:
                    check_image(im)
            seen.add(row.id)
            row.line = line
            rows.append(_place(row))
        except BadRow as e:
            skipped.append(Skipped(str(path), line, rid, str(e)))
    if not rows:
        why = f"; {len(skipped)} unreadable rows, the first: {skipped[0]}" if skipped else " (the file is empty)"
        raise ValueError(
            f"{path}: no benchmark rows could be read{why}. Readable formats: {KNOWN_FORMATS} (see --format)"
        )
    return Dataset(rows, skipped, [str(path)], {str(path): describe_columns(fmt, list(keys), opts, spellings)})


def load(
    paths: list[str | Path], fmt: str = "auto", verify_images: bool = True, opts: formats.ImportOptions | None = None
) -> Dataset:
    """Rows of every file of `paths` (folders and hub-cache dataset ids expanded by `formats.expand`; an id
    seen in an earlier file is skipped); see `load_file`."""
    from . import formats

    out = Dataset([], [], [])
    for p in formats.expand(paths, opts.split if opts else None):
        d = load_file(p, fmt, verify_images, opts)
        seen = {r.id for r in out.rows}
        for r in d.rows:
            if r.id in seen:
                out.skipped.append(Skipped(str(p), 0, r.id, "duplicate id across files"))
            else:
                out.rows.append(r)
        out.skipped += d.skipped
        out.files += d.files
        out.columns.update(d.columns)
    if opts and opts.lang == "both":
        out.rows = formats.split_languages(out.rows)
    return out


_SAME_NAME = {
    "id": "id",
    "question": "question",
    "hint": "hint",
    "answer": "answer (an option's letter, index or text; the accepted answers of an open question)",
    "answers": "answer (the accepted answers of an open question)",
    **{k: k for k in (*GROUP_KEYS, "split")},
    "image": "image",
    "images": "images",
    "meta": "metadata (a JSON object)",
}
_VLMEVAL = {
    "index": "id",
    "image": "image (base64)",
    "image_path": "image (a path)",
    "question": "question",
    "hint": "hint",
    "answer": "answer (a letter)",
    "category": "category",
    "l2-category": "question_type",
    "country": "country",
    "language": "language",
    "split": "split",
}


def describe_columns(
    fmt: str, columns: list[str], opts: formats.ImportOptions, spellings: Counter[str] | None = None
) -> list[tuple[str, str]]:
    """(column, how it is read) for each column of a file read as `fmt`."""
    spellings = spellings or Counter()
    ways = "; ".join(f"{k} in {n} row{'s' * (n != 1)}" for k, n in spellings.most_common()) or "none given"
    if fmt == "vlmeval":
        letters = [c for c in LETTERS if c in columns]
        out = [(c, _VLMEVAL.get(c, "not read")) for c in columns if c not in letters]
        return out + ([(", ".join(letters), "options, one column per option")] if letters else [])
    if fmt not in ("canonical", "columns"):
        return [("*", f"read as {fmt} (the columns of its published schema)")]
    mapped = {c: field for field, spec in opts.columns.items() for c in spec.split("+")}
    cells = [] if "options" in columns or "options" in opts.columns else option_columns(columns)
    out = []
    for c in columns:
        if c in mapped:
            how = mapped[c] + (f" ({ways})" if mapped[c] == "options" and "+" not in opts.columns["options"] else "")
            out.append((c, how + " (--columns)"))
        elif c == "options":
            out.append((c, f"options ({ways})"))
        elif c not in cells:
            out.append((c, _SAME_NAME.get(c, "kept as metadata")))
    if cells:
        out.append((", ".join(cells), "options, one column per option"))
    return out


# ---------------------------------------------------------------------------------------- writing


def to_record(row: Row, image_names: list[str] | None = None) -> dict:
    """Canonical JSON record; images as the given relative names, else embedded base64."""
    images = image_names or [
        {"bytes": base64.b64encode(im).decode()} if isinstance(im, bytes) else im for im in row.images
    ]
    # open answers go to `answers` so a parquet `answer` column keeps one type
    letter = LETTERS[row.answer] if isinstance(row.answer, int) else None
    answers = row.answer if isinstance(row.answer, list) else None
    rec = {
        "id": row.id,
        "images": images,
        "question": row.question,
        "options": row.options,
        "answer": letter,
        "answers": answers,
        "hint": row.hint or None,
    }
    rec.update({k: getattr(row, k) for k in (*GROUP_KEYS, "split") if getattr(row, k)})
    rec.update(row.meta)
    return {k: v for k, v in rec.items() if v not in (None, [], "")}


def write(rows: list[Row], out: str | Path) -> None:
    """JSONL (images copied next to it, referenced by relative path) or parquet (images embedded)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        recs = []
        for r in rows:
            rec = to_record(r, ["-"] * len(r.images))
            rec["images"] = [{"bytes": im if isinstance(im, bytes) else Path(im).read_bytes()} for im in r.images]
            rec["options"] = r.options
            rec["meta"] = json.dumps(r.meta, ensure_ascii=False) if r.meta else None
            for k in r.meta:
                rec.pop(k, None)
            recs.append(rec)
        cols = list(dict.fromkeys(k for rec in recs for k in rec))  # from_pylist keeps only row 0's keys
        pq.write_table(pa.Table.from_pylist([{k: rec.get(k) for k in cols} for rec in recs]), out)
        return
    img_dir = out.with_name(out.stem + "_images")
    with out.open("w", encoding="utf-8") as f:
        for r in rows:
            names = []
            for j, im in enumerate(r.images):
                data = im if isinstance(im, bytes) else Path(im).read_bytes()
                ext = (Image.open(io.BytesIO(data)).format or "png").lower()
                name = f"{hashlib.sha1(data).hexdigest()[:16]}_{j}.{ext}"
                img_dir.mkdir(exist_ok=True)
                if not (img_dir / name).exists():
                    (img_dir / name).write_bytes(data)
                names.append(f"{img_dir.name}/{name}")
            f.write(json.dumps(to_record(r, names or None), ensure_ascii=False) + "\n")
