"""CulturalVQA: `u_id`/`id, image, question`, `answers` when present (the public file withholds them:
predictions only), `country`."""

from __future__ import annotations

from ..formats import Source, _images
from ..rows import BadRow, Row, _answer, _text

SUMMARY = "CulturalVQA parquet/JSONL"
ID_KEYS = ("u_id", "id")


def detect(cols: set[str]) -> bool:
    return "u_id" in cols  # the public file (image, question) also reads fine as canonical


def to_row(rec: dict, line: int, src: Source) -> Row:
    answers = rec.get("answers")
    if isinstance(answers, str):
        answers = [answers]
    row = Row(
        id=_text(rec.get("u_id")) or _text(rec.get("id")) or f"{src.stem}:{line}",
        question=_text(rec.get("question")),
        images=_images(rec, src.base, src.opts, "image"),
        answer=_answer(list(answers) if answers else None, []),
        country=_text(rec.get("country")),
        category=_text(rec.get("category")) or _text(rec.get("facet")),
        question_type="culturalvqa",
        language=_text(rec.get("language")) or "English",
        meta={"format": "culturalvqa"},
    )
    if not row.images:
        raise BadRow("missing image")
    return row
