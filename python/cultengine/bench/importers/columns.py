"""`--columns`: any table, its columns mapped onto the canonical fields (`question=Q,options=A+B+C,answer=Label`),
then read as canonical. Chosen by the flag, never detected."""

from __future__ import annotations

from typing import Any

from ..formats import Source, _images
from ..rows import BadRow, Row, _blank, _canonical, _options

SUMMARY = "any table with --columns"
ID_KEYS = ()


def detect(cols: set[str]) -> bool:
    return False


def to_row(rec: dict, line: int, src: Source) -> Row:
    """`--columns`: the file's columns renamed onto the canonical fields, then read as canonical."""
    mapped: dict[str, Any] = {}
    used: set[str] = set()
    for key, spec in src.opts.columns.items():
        cols = spec.split("+")
        missing = [c for c in cols if c not in rec]
        if missing:
            raise BadRow(f"--columns {key}={spec}: no column {missing[0]!r} (columns: {', '.join(map(str, rec))})")
        used.update(cols)
        mapped[key] = [rec[c] for c in cols if not _blank(rec[c])] if len(cols) > 1 else rec[cols[0]]
    if "options" in mapped and not isinstance(mapped["options"], list | tuple) and not _blank(mapped["options"]):
        # a JSON list in text or options separated by rows.OPTION_SEPARATOR, as in a canonical file
        mapped["options"] = _options(mapped["options"], f"options column {src.opts.columns['options']!r}")
    if "image" in mapped:
        mapped["image"] = _images(mapped, src.base, src.opts, "image") or None
    extra = {k: v for k, v in rec.items() if k not in used and k not in mapped and not isinstance(v, bytes | dict)}
    return _canonical({**extra, **mapped}, src.base, line, src.stem)
