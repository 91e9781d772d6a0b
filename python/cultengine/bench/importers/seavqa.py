"""SEA-VQA: `question, choice_a .. choice_d, correct_answer, image_path`, `country`/`category` if present."""

from __future__ import annotations

import re

from ..formats import Source, _images
from ..rows import BadRow, Row, _answer, _blank, _text

SUMMARY = "SEA-VQA CSV"
ID_KEYS = ("id", "ID")


def detect(cols: set[str]) -> bool:
    return {"choice_a", "correct_answer"} <= cols


def to_row(rec: dict, line: int, src: Source) -> Row:
    options = []
    for letter in "abcdefgh":
        if _blank(rec.get(f"choice_{letter}")):
            break
        options.append(_text(rec[f"choice_{letter}"]))
    raw = _text(rec.get("correct_answer"))
    key = re.sub(r"^(choice|option)[_ ]?", "", raw.casefold()).strip(" .()")
    answer = (
        options.index(raw)
        if raw in options
        else "abcdefgh".index(key)
        if len(key) == 1 and key in "abcdefgh"[: len(options)]
        else _answer(raw or None, options)
    )
    row = Row(
        id=_text(rec.get("id")) or _text(rec.get("ID")) or f"{src.stem}:{line}",
        question=_text(rec.get("question")),
        options=options,
        answer=answer,
        images=_images(rec, src.base, src.opts, "image", "image_path"),
        country=_text(rec.get("country")),
        category=_text(rec.get("category")),
        language=_text(rec.get("language")) or "English",
        question_type="seavqa",
        meta={"format": "seavqa"},
    )
    if not row.images:
        raise BadRow("missing image")
    return row
