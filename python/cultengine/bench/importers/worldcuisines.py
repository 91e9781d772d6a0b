"""WorldCuisines: `qa_id, lang, image_url, multi_choice_prompt, open_ended_prompt, multi_choice_answer` (1-based),
`answer`; the options are parsed out of the prompt, or with `mc_prompt="as-given"` the prompt is asked verbatim and
its option numbers are the choices. `open_answers` asks the open prompt."""

from __future__ import annotations

from ..formats import Source, _images, _mc_from_prompt, _place_meta
from ..rows import BadRow, Row, _answer, _blank, _text

SUMMARY = "WorldCuisines"
ID_KEYS = ("qa_id",)


def detect(cols: set[str]) -> bool:
    return bool(cols & {"multi_choice_prompt", "open_ended_prompt"})


def to_row(rec: dict, line: int, src: Source) -> Row:
    meta = {"format": "worldcuisines", **_place_meta(rec, ("prompt_id", "prompt_type", "food_id", "task", "image_url"))}
    if src.opts.open_answers:
        question, options, answer = _text(rec.get("open_ended_prompt")), [], _answer(rec.get("answer"), [])
    else:
        label = rec.get("multi_choice_answer")
        question, options, answer, extra = _mc_from_prompt(
            _text(rec.get("multi_choice_prompt")), src.opts, None if _blank(label) else _text(label)
        )
        meta.update(extra)
        meta["answer_text"] = _text(rec.get("answer"))
    row = Row(
        id=_text(rec.get("qa_id")) or f"{src.stem}:{line}",
        question=question,
        options=options,
        answer=answer,
        images=_images(rec, src.base, src.opts, "image", "image_path", "image_url"),
        language=_text(rec.get("lang")),
        category=_text(rec.get("prompt_type")) or "food",
        question_type="worldcuisines-" + ("open" if src.opts.open_answers else "mc"),
        meta=meta,
    )
    if not row.images:
        raise BadRow("missing image")
    return row
