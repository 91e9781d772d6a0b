"""Open-answer scoring: VQA-normalised match and a model as judge.

- `vqa_normalize`: the VQA accuracy normalisation (lower case, punctuation, English number words to
  digits, articles dropped), applied to both the prediction and each reference answer.
- Model-as-judge (`--judge-model DIR`, as ALM-Bench and CulturalVQA judge open answers): a second
  checkpoint is run through `Engine.score` on a judging prompt (question, reference answers, candidate
  answer; `prompts/judge.jinja`, or `--judge-prompt FILE`) with the choices "yes" and "no". The verdict
  is the more likely choice and its probability P(yes) = softmax over the two choices' log-likelihoods,
  so nothing depends on parsing free text. Each sample's verdict goes to `judgments.jsonl` in the run
  directory (append-only, fsync'd per batch), so a run killed while judging resumes with the samples
  still unjudged and never regenerates an answer.
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from .. import runlog
from .rows import Row

PROMPT_FILE = Path(__file__).with_name("prompts") / "judge.jinja"
JUDGMENTS = "judgments.jsonl"
CHOICES = ("yes", "no")

_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}


def vqa_normalize(text: str) -> str:
    """The VQA evaluation's answer normalisation: case, punctuation, number words, articles."""
    text = unicodedata.normalize("NFKC", text).casefold().replace("\n", " ").strip()
    text = re.sub(r"(?<=\d),(?=\d)", "", text)  # 1,000 -> 1000
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)  # a period, unless a decimal point
    text = "".join(" " if unicodedata.category(ch).startswith(("P", "S")) and ch != "." else ch for ch in text)
    words = [_NUMBERS.get(w, w) for w in text.split()]
    return " ".join(w for w in words if w not in _ARTICLES)


def normalized_match(prediction: str, answers: list[str]) -> bool:
    p = vqa_normalize(prediction)
    return bool(p) and p in {vqa_normalize(a) for a in answers}


@dataclass
class JudgePrompt:
    """The judging prompt (a Jinja template: question, answers, prediction, country, language)."""

    template: str

    def __post_init__(self) -> None:
        self._compiled = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(self.template)

    def fingerprint(self, model: str | Path) -> str:
        """Identity of a judge (checkpoint + prompt): verdicts of different judges are never mixed."""
        return hashlib.sha256(f"{Path(model).resolve()}\n{self.template}".encode()).hexdigest()[:12]

    @classmethod
    def load(cls, path: str | Path | None = None) -> JudgePrompt:
        return cls(Path(path or PROMPT_FILE).read_text(encoding="utf-8"))

    def request(self, row: Row, prediction: str) -> dict[str, Any]:
        """A text-only scoring request: the rendered prompt, with the choices "yes" and "no"."""
        text = self._compiled.render(
            question=row.question,
            answers=list(row.answer or []),
            prediction=prediction,
            country=row.country,
            language=row.language,
        ).strip()
        return {"messages": [{"role": "user", "content": [{"type": "text", "text": text}]}], "choices": list(CHOICES)}


def verdict(out: Any) -> dict[str, Any]:
    """A judge's `ScoreOutput` -> {judge_correct, judge_p_yes, judge_logprobs} (or judge_error)."""
    if getattr(out, "error", None):
        return {"judge_error": out.error}
    yes, no = (c.logprob for c in out.choices)
    p_yes = 1.0 / (1.0 + math.exp(no - yes))
    return {
        "judge_correct": p_yes >= 0.5,
        "judge_p_yes": round(p_yes, 6),
        "judge_logprobs": [round(yes, 6), round(no, 6)],
    }


def judgeable(row: Row, rec: dict | None) -> bool:
    """Open, labelled, answered without an engine error."""
    return rec is not None and isinstance(row.answer, list) and not rec.get("error") and "prediction" in rec


def run_judge(
    run_dir: Path,
    rows: list[Row],
    recs: dict[str, dict],
    model: str,
    make_engine: Callable[[], Any],
    prompt: JudgePrompt,
    batch: int,
) -> int:
    """Judge every judgeable sample not yet in `judgments.jsonl`; returns how many were judged now.
    The judge engine is built only when something is left to judge."""
    log = runlog.ResultLog(Path(run_dir) / JUDGMENTS)
    judge_id = prompt.fingerprint(model)
    if any(j.get("judge") != judge_id for j in log.read()):
        raise ValueError(
            f"{log.path} holds verdicts of another judge model or prompt; delete it to judge again "
            "with this one (the answers are kept)"
        )
    todo = [r for r in rows if judgeable(r, recs.get(r.id))]
    pending = [r for r in todo if r.id not in log.done]
    print(
        f"judging: {len(todo) - len(pending)} of {len(todo)} samples already judged, {len(pending)} to go",
        file=sys.stderr,
        flush=True,
    )
    if not pending:
        return 0
    from ..console import bar

    engine = make_engine()
    progress = bar(len(todo), initial=len(todo) - len(pending), desc="judging")
    try:
        for start in range(0, len(pending), batch):
            chunk = pending[start : start + batch]
            outs = engine.score([prompt.request(r, recs[r.id]["prediction"]) for r in chunk], use_tqdm=False)
            log.write({"id": r.id, "judge": judge_id, **verdict(o)} for r, o in zip(chunk, outs, strict=True))
            progress.update(len(chunk))
    finally:
        progress.close()
        log.close()
    return len(pending)


def attach(run_dir: Path, recs: list[dict]) -> bool:
    """Copy the stored verdicts onto the result records, replacing any earlier ones (of a judgments file
    since deleted); True when a record changed."""
    judged = {j["id"]: j for j in runlog.read(Path(run_dir) / JUDGMENTS)}
    changed = False
    for rec in recs:
        old = {k: rec.pop(k) for k in [k for k in rec if k.startswith("judge_")]}
        j = judged.get(rec["id"])
        if j:
            rec.update({k: v for k, v in j.items() if k not in ("id", "judge")})
        changed |= old != {k: v for k, v in rec.items() if k.startswith("judge_")}
    return changed


def agreement(recs: list[dict]) -> dict[str, Any]:
    """How often the judge agrees with exact and normalised match, Cohen's kappa with exact match."""
    both = [r for r in recs if r.get("judge_correct") is not None and r.get("correct") is not None]
    out: dict[str, Any] = {"n": len(both), "errors": sum("judge_error" in r for r in recs)}
    if not both:
        return out
    j = [bool(r["judge_correct"]) for r in both]
    for name, field in (("exact_match", "correct"), ("normalized_match", "normalized")):
        e = [bool(r.get(field)) for r in both]
        agree = sum(a == b for a, b in zip(j, e, strict=True)) / len(both)
        out[f"agreement_{name}"] = round(agree, 6)
        if name == "exact_match":
            pj, pe = sum(j) / len(j), sum(e) / len(e)
            chance = pj * pe + (1 - pj) * (1 - pe)
            out["kappa_exact_match"] = None if chance == 1 else round((agree - chance) / (1 - chance), 6)
    out["judge_says_right_exact_says_wrong"] = sum(a and not r["correct"] for a, r in zip(j, both, strict=True))
    out["judge_says_wrong_exact_says_right"] = sum(r["correct"] and not a for a, r in zip(j, both, strict=True))
    out["mean_p_yes"] = round(sum(r["judge_p_yes"] for r in both) / len(both), 6)
    return out


def markdown(summary: dict) -> list[str]:
    """The report's judge section (empty when nothing was judged)."""
    a = summary.get("judge")
    if not a or not a.get("n"):
        return []
    pct = lambda v: "-" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    return [
        "## Judge",
        "",
        f"- judge model: {summary.get('config', {}).get('judge_model')}, {a['n']} samples judged"
        + (f", {a['errors']} judge errors" if a["errors"] else ""),
        f"- agreement with exact match: {pct(a.get('agreement_exact_match'))} (Cohen's kappa "
        f"{a.get('kappa_exact_match')}), with normalised match: {pct(a.get('agreement_normalized_match'))}",
        f"- judge right / exact match wrong: {a['judge_says_right_exact_says_wrong']}; judge wrong / exact "
        f"match right: {a['judge_says_wrong_exact_says_right']}; mean P(yes) {a['mean_p_yes']:.3f}",
        "",
    ]
