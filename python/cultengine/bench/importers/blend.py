"""BLEnD: multiple choice (`MCQID, ID, country, prompt, choices` (JSON letter -> text), `choice_countries,
answer_idx`) and short answer (`ID, question, en_question, annotations` (`answers`/`en_answers`, `count`), country
from the column or the file name `{Country}_data.json`). Text only."""

from __future__ import annotations

import json
import re

from .. import countries
from ..formats import Source, _bilingual
from ..rows import BadRow, Row, _blank, _text

SUMMARY = "BLEnD JSON"
ID_KEYS = ("MCQID", "ID")


def detect(cols: set[str]) -> bool:
    return {"MCQID", "answer_idx"} <= cols or {"en_question", "annotations"} <= cols


# BLEnD's 16 countries/regions (as the files spell them) -> (country in the table, local language)
BLEND_PLACES = {
    "Algeria": ("Algeria", "Arabic"),
    "Assam": ("India", "Assamese"),
    "Azerbaijan": ("Azerbaijan", "Azerbaijani"),
    "China": ("China", "Chinese"),
    "Ethiopia": ("Ethiopia", "Amharic"),
    "Greece": ("Greece", "Greek"),
    "Indonesia": ("Indonesia", "Indonesian"),
    "Iran": ("Iran", "Persian"),
    "Mexico": ("Mexico", "Spanish"),
    "North_Korea": ("North Korea", "Korean"),
    "Northern_Nigeria": ("Nigeria", "Hausa"),
    "South_Korea": ("South Korea", "Korean"),
    "Spain": ("Spain", "Spanish"),
    "UK": ("United Kingdom", "English"),
    "US": ("United States", "English"),
    "West_Java": ("Indonesia", "Sundanese"),
}


_BLEND_MARKER = " Without any explanation"  # the instruction BLEnD appends to every MC prompt


def _blend_place(name: str) -> tuple[str, str, str]:
    """(country, local language, BLEnD's own region name) from a country column or a file name."""
    name = re.sub(r"(_data|_questions|-\d{5}-of-\d{5})$", "", name.strip())
    key = next((k for k in BLEND_PLACES if k.casefold() == name.replace(" ", "_").casefold()), None)
    if key:
        return (*BLEND_PLACES[key], key)
    c = countries.lookup(name.replace("_", " "))
    return (c.name if c else name.replace("_", " ")), "", name


def to_row(rec: dict, line: int, src: Source) -> Row:
    if "annotations" in rec or "en_question" in rec:
        return _short_answer(rec, line, src)
    country, _, place = _blend_place(_text(rec.get("country")) or src.stem)
    choices = rec.get("choices")
    if isinstance(choices, str):
        try:
            choices = json.loads(choices)
        except ValueError:
            raise BadRow("choices is not a JSON object") from None
    if not isinstance(choices, dict) or len(choices) < 2:
        raise BadRow("choices is not an object of two or more lettered options")
    letters = sorted(choices)
    label = _text(rec.get("answer_idx"))
    if label and label not in letters:
        raise BadRow(f"answer_idx {label!r} not among choices {letters}")
    prompt = _text(rec.get("prompt"))
    meta = {"format": "blend", "blend_region": place, "ID": _text(rec.get("ID"))}
    if not _blank(rec.get("choice_countries")):
        cc = rec["choice_countries"]
        meta["choice_countries"] = json.loads(cc) if isinstance(cc, str) else cc
    if src.opts.mc_prompt == "as-given":
        question, options = prompt, letters
        meta.update(prompt_as_given=True, option_texts=[_text(choices[k]) for k in letters])
    else:
        question, options = prompt.split(_BLEND_MARKER, 1)[0].strip(), [_text(choices[k]) for k in letters]
    return Row(
        id=_text(rec.get("MCQID")) or f"{src.stem}:{line}",
        question=question,
        options=options,
        answer=letters.index(label) if label else None,
        country=country,
        language="English",
        category=_text(rec.get("Topic")) or _text(rec.get("topic")),
        question_type="blend-mc",
        meta=meta,
    )


def _short_answer(rec: dict, line: int, src: Source) -> Row:
    country, local_lang, place = _blend_place(_text(rec.get("country")) or src.stem)
    anns = rec.get("annotations")
    if not _blank(anns) and not isinstance(anns, list):
        raise BadRow("annotations is not a list")
    anns = sorted(anns or [], key=lambda a: -int(a.get("count") or 0))  # most-voted answers first

    def answers(key: str) -> list[str] | None:
        out = list(dict.fromkeys(_text(x) for a in anns for x in (a.get(key) or []) if _text(x)))
        return out or None

    local = {"question": _text(rec.get("question")), "answer": answers("answers")}
    english = {
        "question": _text(rec.get("en_question")) or local["question"],
        "answer": answers("en_answers") or local["answer"],
    }
    row = Row(
        id=f"{place}:{_text(rec.get('ID')) or line}",
        question="",
        country=country,
        language=local_lang or _text(rec.get("language")),
        category=_text(rec.get("Topic")),
        question_type="blend-short",
        meta={
            "format": "blend",
            "blend_region": place,
            "ID": _text(rec.get("ID")),
            "annotation_counts": [int(a.get("count") or 0) for a in anns],
        },
    )
    return _bilingual(row, src.opts, english, local)
