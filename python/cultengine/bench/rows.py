"""One benchmark row and the cell readers every importer shares: options (lists, `|`-separated text, one column
per option), answers (letter, index or text), images (paths confined to the dataset, bytes, data URIs), VLMEvalKit
and canonical records. Below `data.py` (which picks an importer and reads files) and `formats.py` (the published
schemas), so that neither imports the other's internals in a circle.
"""

from __future__ import annotations

import ast
import base64
import binascii
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..image_files import check_image_size
from . import countries

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
GROUP_KEYS = ("country", "region", "continent", "category", "question_type", "language")
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
