"""ALM-Bench: `file_name` (image), `ID, Language, Category, Question_Type` (MCQ, T/F, SVQA, LVQA: each name
ALM-Bench uses is accepted), `English_Question, English_Answer, Translated_Question, Translated_Answer, Image_Url`;
MCQ options are parsed from the question text."""

from __future__ import annotations

import re
from typing import Any

from ..formats import Source, _bilingual, _images, _place_meta
from ..rows import LETTERS, BadRow, Row, _answer, _text, split_options

SUMMARY = "ALM-Bench parquet/JSONL"
ID_KEYS = ("ID",)


def detect(cols: set[str]) -> bool:
    return bool(cols & {"Question_Type", "English_Question", "Translated_Question"})


ALM_TYPES = {
    "MCQ": ("multiple choice", "mcq"),
    "T/F": ("true false", "true/false", "t/f", "tf"),
    "SVQA": ("short", "svqa"),
    "LVQA": ("long", "lvqa"),
}


def alm_type(raw: str) -> str:
    """ALM-Bench's `Question_Type` ("Multiple Choice Questions", "True False Question", "Short Questions",
    "Long Questions", or the codes) -> MCQ | T/F | SVQA | LVQA."""
    s = re.sub(r"[\s_-]+", " ", raw.casefold()).strip()
    for code, keys in ALM_TYPES.items():
        if any(s == k or s.startswith(k + " ") or (" " in k and k in s) for k in keys):
            return code
    raise BadRow(f"unknown Question_Type {raw!r} (expected MCQ, T/F, SVQA or LVQA)")


def _alm_version(question: str, answer: str, qtype: str, en_answer: str) -> dict[str, Any]:
    if qtype == "MCQ":
        question, options = split_options(question)
        if not options:
            raise BadRow("multiple-choice question without lettered options in its text")
        # answers look like "B", "B. text" or the option text; the English answer's letter is the fallback
        for a in (answer, en_answer):
            m = re.match(r"^\(?([A-H])[.):]?(\s|$)", a)
            if m and LETTERS.index(m.group(1)) < len(options):
                return {"question": question, "options": options, "answer": LETTERS.index(m.group(1))}
            hit = next((i for i, o in enumerate(options) if o.casefold() == a.casefold()), None)
            if hit is not None:
                return {"question": question, "options": options, "answer": hit}
        raise BadRow(f"answer {answer!r} not among options {options}")
    if qtype == "T/F":
        truth = {"true": 0, "yes": 0, "false": 1, "no": 1}
        a = next(
            (truth[x] for x in (en_answer.casefold().strip(" ."), answer.casefold().strip(" .")) if x in truth), None
        )
        if a is None:
            raise BadRow(f"true/false answer {en_answer or answer!r} is neither True nor False")
        return {"question": question, "options": ["True", "False"], "answer": a}
    return {"question": question, "options": [], "answer": _answer(answer or None, [])}


def to_row(rec: dict, line: int, src: Source) -> Row:
    raw_type = _text(rec.get("Question_Type"))
    qtype = alm_type(raw_type)
    en_q, en_a = _text(rec.get("English_Question")), _text(rec.get("English_Answer"))
    english = _alm_version(en_q, en_a, qtype, en_a)
    local_q = _text(rec.get("Translated_Question"))
    local = _alm_version(local_q, _text(rec.get("Translated_Answer")), qtype, en_a) if local_q else english
    row = Row(
        id=_text(rec.get("ID")) or f"{src.stem}:{line}",
        question="",
        images=_images(rec, src.base, src.opts, "image", "file_name", "Image_Url"),
        country=_text(rec.get("Country")),
        language=_text(rec.get("Language")),
        category=_text(rec.get("Category")),
        question_type=qtype,
        meta={
            "format": "almbench",
            "Question_Type": raw_type,
            "english_question": en_q,
            **_place_meta(rec, ("Image_Url",)),
        },
    )
    if not row.images:
        raise BadRow("missing image")
    return _bilingual(row, src.opts, english, local)
