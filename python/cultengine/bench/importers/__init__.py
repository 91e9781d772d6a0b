"""The registry of benchmark formats: one module per format in this package, named in `NAMES`.

Each module declares `SUMMARY` (how messages name it), `ID_KEYS` (the columns a record names itself by),
`detect(columns) -> bool` (whether a file's first record is in this format) and `to_row(record, line, source)`
(one record -> `rows.Row`, or `rows.BadRow`). `--format`'s choices, detection, the readable-formats message and
the ids of unreadable records all come from here. Adding a format: one module plus its name below.

This file imports no format module until one is used, so `--help` stays fast.
"""

from __future__ import annotations

import importlib
from functools import cache
from types import ModuleType

# Detection tries the published formats in this order; a file none claims is vlmeval (.tsv) or canonical.
NAMES = ("canonical", "vlmeval", "cvqa", "almbench", "worldcuisines", "seavqa", "blend", "culturalvqa", "columns")


def module(name: str) -> ModuleType:
    if name not in NAMES:
        raise ValueError(f"unknown format {name!r}; choose one of {', '.join(NAMES)}")
    return importlib.import_module(f".{name}", __name__)


def detect(columns: set[str], suffix: str) -> str:
    """The format of a file whose first record has `columns` (`suffix`: the file's extension)."""
    found = next((name for name in NAMES if module(name).detect(columns)), None)
    return found or ("vlmeval" if suffix.lower() == ".tsv" else "canonical")


@cache
def _id_keys(fmt: str) -> tuple[str, ...]:
    """The id columns to try for a record of `fmt`: its own first, then every other format's."""
    return tuple(dict.fromkeys((*module(fmt).ID_KEYS, *(k for name in NAMES for k in module(name).ID_KEYS))))


def record_id(rec: dict, fmt: str, columns: dict[str, str]) -> str:
    """The id a record names itself by (its format's id columns first), to report it when it cannot be read."""
    from ..rows import _blank, _text

    keys = (columns["id"], *_id_keys(fmt)) if "id" in columns else _id_keys(fmt)
    return next((_text(rec[k]) for k in keys if not _blank(rec.get(k))), "")


def known_formats() -> str:
    """The readable formats, for messages."""
    return ", ".join(module(name).SUMMARY for name in NAMES)
