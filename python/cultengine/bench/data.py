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
  maps any table): one module each in `importers/` (canonical and vlmeval too), whose `__init__` is the
  registry. `formats.py` holds what they share and expands folders (Hugging Face hub snapshots, parquet
  shards, `save_to_disk`) and `OWNER/NAME` from the local hub cache.

Country -> region/continent comes from `countries.csv` when the file gives only a country.

Image paths stay inside the dataset: a relative path resolves under the data file's folder (or the
import options' `image_root`) and may not lead out of it, through `..`, a symlink or an absolute path
(a Hugging Face hub snapshot's own `blobs/` count as inside: its files are links there).
`allow_outside_images=True` (`--allow-absolute-image-paths`) trusts the file's paths instead. A refused
path makes its row a skipped row, and nothing outside is opened.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from .. import datafiles
from . import importers
from .rows import (
    GROUP_KEYS,
    LETTERS,
    BadRow,
    Dataset,
    Row,
    Skipped,
    _place,
    check_image,
    option_columns,
    options_spelling,
)

if TYPE_CHECKING:
    from . import formats


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
                f"objects. Readable formats: {importers.known_formats()}"
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
    return importers.detect(set(first or ()), path.suffix)


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
    source = formats.Source(base, stem, opts)
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
            rid = importers.record_id(rec, fmt, opts.columns)
            row = importers.module(fmt).to_row(rec, line, source)
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
            f"{path}: no benchmark rows could be read{why}. Readable formats: {importers.known_formats()} "
            "(see --format)"
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
