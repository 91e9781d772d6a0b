"""VLMEvalKit TSV: `index`->id, `image` (base64; a bare index refers to that row's image), `image_path`, `question`,
`hint`, option columns `A`..`Z`, `answer` (letter), `category`, `l2-category`->question_type, and `country`,
`language` when present. A `.tsv` file no other format claims is read as this."""

from __future__ import annotations

from ..formats import Source
from ..rows import LETTERS, Row, _answer, _blank, _image, _text

SUMMARY = "VLMEvalKit TSV"
ID_KEYS = ("index",)


def detect(cols: set[str]) -> bool:
    return False  # by extension: the registry's fallback for .tsv


def to_row(rec: dict, line: int, src: Source) -> Row:
    idx = _text(rec.get("index")) or str(line)
    img = _text(rec.get("image"))
    if img:
        if len(img) < 64 and img in src.memo:  # VLMEvalKit stores a repeated image once
            img = src.memo[img]
        src.memo.setdefault(idx, img)
        images = [_image(img, src.base, True)]
    elif _text(rec.get("image_path")):
        images = [_image(_text(rec["image_path"]), src.base, False)]
    else:
        images = []
    options = []
    for letter in LETTERS:
        if letter not in rec or _blank(rec[letter]):
            break
        options.append(_text(rec[letter]))
    return Row(
        id=idx,
        question=_text(rec.get("question")),
        images=images,
        options=options,
        answer=_answer(rec.get("answer"), options),
        hint=_text(rec.get("hint")),
        country=_text(rec.get("country")),
        language=_text(rec.get("language")),
        category=_text(rec.get("category")),
        question_type=_text(rec.get("l2-category")),
        split=_text(rec.get("split")),
    )
