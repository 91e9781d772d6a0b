"""Published benchmark schemas -> canonical rows (CVQA, ALM-Bench, CulturalVQA).

Each importer maps one record of the benchmark's own file onto `data.Row`; a record that cannot be
mapped raises `data.BadRow`, which the loader reports with its line and id and skips.
"""

from __future__ import annotations

import re
from pathlib import Path

from .data import Row, _answer, _blank, _image, _text, parse_subset, split_options


def _cvqa(rec: dict, base: Path, line: int, stem: str) -> Row:
    country, lang = parse_subset(_text(rec.get("Subset")))
    options = [_text(o) for o in rec.get("Options") or []]
    label = rec.get("Label")
    return Row(
        id=_text(rec.get("ID")) or f"{stem}:{line}", question=_text(rec.get("Question")),
        images=[_image(rec.get("image"), base, False)], options=options,
        answer=_answer(None if _blank(label) or int(label) < 0 else int(label), options),
        country=country, language=lang, category=_text(rec.get("Category")), question_type="cvqa",
        meta={k: rec[k] for k in ("Translated Question", "Translated Options", "Image Type") if k in rec},
    )


def _almbench(rec: dict, base: Path, line: int, stem: str) -> Row:
    qtype = _text(rec.get("Question_Type"))
    question = _text(rec.get("Translated_Question")) or _text(rec.get("English_Question"))
    answer = _text(rec.get("Translated_Answer")) or _text(rec.get("English_Answer"))
    question, options = split_options(question)
    if not options and "true" in qtype.lower() and "false" in qtype.lower():
        options = ["True", "False"]
    if options:  # answers look like "B", "B. text" or the option text
        m = re.match(r"^\(?([A-H])[.):]?(\s|$)", answer)
        answer = m.group(1) if m else next((o for o in options if o.casefold() == answer.casefold()), answer)
    img = rec.get("image") if not _blank(rec.get("image")) else rec.get("file_name")
    return Row(
        id=_text(rec.get("ID")) or f"{stem}:{line}", question=question,
        images=[_image(img, base, False)] if not _blank(img) else [], options=options,
        answer=_answer(answer or None, options), country=_text(rec.get("Country")),
        language=_text(rec.get("Language")), category=_text(rec.get("Category")), question_type=qtype,
        meta={"english_question": _text(rec.get("English_Question"))},
    )


def _culturalvqa(rec: dict, base: Path, line: int, stem: str) -> Row:
    answers = rec.get("answers")
    if isinstance(answers, str):
        answers = [answers]
    return Row(
        id=_text(rec.get("u_id")) or _text(rec.get("id")) or f"{stem}:{line}",
        question=_text(rec.get("question")), images=[_image(rec.get("image"), base, False)],
        answer=_answer(list(answers) if answers else None, []), country=_text(rec.get("country")),
        category=_text(rec.get("category")) or _text(rec.get("facet")), question_type="culturalvqa",
        language=_text(rec.get("language")) or "English",
    )


IMPORTERS = {"cvqa": _cvqa, "almbench": _almbench, "culturalvqa": _culturalvqa}
