"""CVQA: `ID, image, Subset` ("('Japanese', 'Japan')"), `Question, Translated Question, Options, Translated
Options, Label` (-1 = unlabelled), `Category, Image Type, Image Source, License`. `ImportOptions.lang` picks the
local-language (`Question`/`Options`) or English (`Translated ...`) text."""

from __future__ import annotations

from ..formats import Source, _bilingual, _images, _label, _list, _place_meta
from ..rows import BadRow, Row, _text, parse_subset

SUMMARY = "CVQA parquet"
ID_KEYS = ("ID",)


def detect(cols: set[str]) -> bool:
    return {"Subset", "Options"} <= cols or {"ID", "Subset"} <= cols


def to_row(rec: dict, line: int, src: Source) -> Row:
    country, lang = parse_subset(_text(rec.get("Subset")))
    local = {"question": _text(rec.get("Question")), "options": _list(rec.get("Options"), "Options")}
    english = {
        "question": _text(rec.get("Translated Question")),
        "options": _list(rec.get("Translated Options"), "Translated Options"),
    }
    if src.opts.lang != "local":  # the English version is asked: it must be complete
        if not english["question"] or not english["options"]:
            raise BadRow(f"--cvqa-lang {src.opts.lang}: no Translated Question / Translated Options")
        if len(english["options"]) != len(local["options"]):
            raise BadRow("Options and Translated Options differ in length")
    row = Row(
        id=_text(rec.get("ID")) or f"{src.stem}:{line}",
        question="",
        images=_images(rec, src.base, src.opts, "image"),
        answer=_label(rec.get("Label"), local["options"]),
        country=country,
        language=lang,
        category=_text(rec.get("Category")),
        question_type="cvqa",
        meta={
            "format": "cvqa",
            **_place_meta(
                rec, ("Subset", "Translated Question", "Translated Options", "Image Type", "Image Source", "License")
            ),
        },
    )
    if not row.images:
        raise BadRow("missing image")
    return _bilingual(row, src.opts, english, local)
