"""Suites: rows -> engine requests, engine outputs -> per-sample results.

Prompt formats (Jinja templates for the user turn; the checkpoint's chat template wraps them, the images
come first in the turn). Variables: question, hint, options, letters, country, language, category.

- mcq, `--scoring loglik`: the question, the lettered options, "Answer with the text of the correct
  option."; each option's text is scored as the assistant's reply by `Engine.score` (one shared context).
  acc = argmax of the summed log-likelihood; acc_norm = argmax of log-likelihood / len(option text in
  characters), as lm-evaluation-harness defines it.
- mcq, `--scoring generate`: same listing, "Answer with the option's letter from the given choices
  directly."; greedy, up to 16 tokens, the letter parsed by `parse_letter`.
- vqa: the question, "Answer the question using a single word or phrase."; greedy, up to 32 tokens,
  scored by exact match (`normalize`: case, punctuation), normalised match (`judge.vqa_normalize`: the
  VQA normalisation, articles and number words too), answer-contained-in-prediction, and with
  `--judge-model` by a judge model (`judge.py`).
  Long-answer rows (ALM-Bench's LVQA): "Answer the question in a few sentences.", up to 256 tokens.
- `--circular`: each question is asked once per rotation of its options and counts right only when
  every rotation is (VLMEvalKit CircularEval); `acc_vanilla` keeps the unrotated score.
A `--template FILE` replaces the text template of the suite being run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

from .judge import normalized_match
from .rows import LETTERS, Row

_LISTING = (
    "{% if hint %}Hint: {{ hint }}\n{% endif %}{{ question }}\n"
    "{% for o in options %}{{ letters[loop.index0] }}. {{ o }}\n{% endfor %}"
)
TEMPLATES = {
    ("mcq", "loglik"): _LISTING + "Answer with the text of the correct option.",
    ("mcq", "generate"): _LISTING + "Answer with the option's letter from the given choices directly.",
    ("vqa", "generate"): "{% if hint %}Hint: {{ hint }}\n{% endif %}{{ question }}\n"
    "Answer the question using a single word or phrase.",
}
MAX_TOKENS = {"mcq": 16, "vqa": 32}
# long-answer questions (ALM-Bench's LVQA) are answered in sentences, up to 256 tokens, and judged
LONG_ANSWER_TYPES = ("LVQA",)
LONG_TEMPLATE = "{% if hint %}Hint: {{ hint }}\n{% endif %}{{ question }}\nAnswer the question in a few sentences."
LONG_MAX_TOKENS = 256


def long_answer(row: Row, suite: str) -> bool:
    return suite == "vqa" and row.question_type in LONG_ANSWER_TYPES


@dataclass
class SuiteConfig:
    suite: str = "mcq"  # mcq | vqa
    scoring: str = "loglik"  # loglik | generate (vqa always generates)
    circular: bool = False
    template: str | None = None  # template text overriding the default

    def __post_init__(self) -> None:
        if self.suite == "vqa":
            self.scoring, self.circular = "generate", False
        src = self.template or TEMPLATES[(self.suite, self.scoring)]
        env = jinja2.Environment(undefined=jinja2.StrictUndefined)
        self._tmpl = env.from_string(src)
        self._long = env.from_string(self.template or LONG_TEMPLATE)

    def __reduce__(self):  # pickled as its fields (a Ray replica gets it): the compiled templates are rebuilt
        return (type(self), (self.suite, self.scoring, self.circular, self.template))

    @classmethod
    def from_args(cls, suite: str, scoring: str, circular: bool, template_file: str | None) -> SuiteConfig:
        text = Path(template_file).read_text(encoding="utf-8-sig") if template_file else None
        return cls(suite, scoring, circular, text)

    def render(self, row: Row, options: list[str]) -> str:
        if row.meta.get("prompt_as_given"):  # the benchmark's own prompt, options and instruction included
            return row.question
        tmpl = self._long if long_answer(row, self.suite) else self._tmpl
        return tmpl.render(
            question=row.question,
            hint=row.hint,
            options=options,
            letters=LETTERS,
            country=row.country,
            language=row.language,
            category=row.category,
        )


def usable(row: Row, cfg: SuiteConfig) -> str | None:
    """Why the row cannot run in this suite, else None."""
    if cfg.suite == "mcq" and len(row.options) < 2:
        return (
            "multiple-choice suite needs at least two options (an options column: a list, a JSON list or "
            "a|b|c; or one column per option: A, B, C... or option_a, option_b...)"
            if not row.options
            else "multiple-choice suite needs at least two options"
        )
    if cfg.suite == "mcq" and len(row.options) > len(LETTERS):
        return "too many options"
    if cfg.suite == "vqa" and row.options:
        return "open-answer suite: the row is multiple choice (run it with --suite mcq)"
    return None


def rotations(row: Row, cfg: SuiteConfig) -> list[int]:
    return list(range(len(row.options))) if cfg.circular and cfg.suite == "mcq" else [0]


def rotate(options: list[str], r: int) -> list[str]:
    return options[r:] + options[:r]


def build_requests(row: Row, cfg: SuiteConfig) -> list[dict[str, Any]]:
    """One engine request per rotation, as chat messages with the images first."""
    reqs = []
    for r in rotations(row, cfg):
        opts = rotate(row.options, r) if cfg.suite == "mcq" else []
        content = [{"type": "image", "image": im} for im in row.images]
        content.append({"type": "text", "text": cfg.render(row, opts)})
        req: dict[str, Any] = {"messages": [{"role": "user", "content": content}]}
        if cfg.scoring == "loglik":
            req["choices"] = opts
        reqs.append(req)
    return reqs


@lru_cache(maxsize=1 << 16)
def _file_digest(path: str, size: int, mtime_ns: int) -> bytes:
    # keyed by size and mtime too, so an image rewritten in place is read again
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").digest()


def _image_digest(im: str | bytes) -> bytes:
    if isinstance(im, bytes):
        return hashlib.sha1(im).digest()
    try:
        st = os.stat(im)
        return _file_digest(im, st.st_size, st.st_mtime_ns)
    except OSError:
        return b"missing:" + im.encode()


def prompt_hash(row: Row, cfg: SuiteConfig) -> str:
    """The rendered prompt and the content (not the names) of the row's images."""
    h = hashlib.sha256(cfg.render(row, row.options).encode())
    for im in row.images:
        h.update(_image_digest(im))
    return h.hexdigest()[:16]


def input_hash(row: Row, cfg: SuiteConfig) -> str:
    """Everything a stored result depends on: the prompt and images, the options, the answer, the groups."""
    rest = json.dumps([row.options, row.answer, row.groups(), row.western], ensure_ascii=False)
    return hashlib.sha256(f"{prompt_hash(row, cfg)}\n{rest}".encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------ normalising


def normalize(text: str) -> str:
    """NFKC, casefold, punctuation (any Unicode P* category) to spaces, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def parse_letter(text: str, options: list[str]) -> int | None:
    """Index of the option a free-form reply names, or None when it names none or several."""
    letters = LETTERS[: len(options)]
    s = unicodedata.normalize("NFKC", text).strip()

    def one(found: set[str]) -> int | None:
        found &= set(letters)
        return letters.index(found.pop()) if len(found) == 1 else None

    # "B", "B.", "(B) ...", "B) ...", "B: ..."; a leading "A " is English, not an answer
    m = re.match(r"^[\s*\"'(\[]*([A-Z])(?:$|[\s*\"']*$|[.):\]]|,)", s)
    if m and m.group(1) in letters:
        return letters.index(m.group(1))
    m = re.search(r"(?:answer|option|choice)\s*(?:is|:)?\s*[*\"'(\[]*([A-Z])\b", s, re.I)
    if m and m.group(1).upper() in letters:
        return letters.index(m.group(1).upper())
    if (i := one(set(re.findall(r"\(([A-Z])\)", s)))) is not None:
        return i
    norm = normalize(s)
    hits = {i for i, o in enumerate(options) if normalize(o) and normalize(o) in norm}
    if len(hits) == 1:
        return hits.pop()
    if len(s.split()) <= 3:
        return one(set(re.findall(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])", s)))
    return None


# ------------------------------------------------------------------------------------ scoring


def _mcq_loglik(row: Row, outs: list, rots: list[int]) -> dict[str, Any]:
    n = len(row.options)
    preds, preds_norm, scores = [], [], None
    for r, out in zip(rots, outs, strict=True):
        lps = [c.logprob for c in out.choices]
        norm = [c.logprob / max(len(c.text), 1) for c in out.choices]
        preds.append((max(range(n), key=lps.__getitem__) + r) % n)
        preds_norm.append((max(range(n), key=norm.__getitem__) + r) % n)
        if r == 0:
            scores = [[round(c.logprob, 6), c.num_tokens] for c in out.choices]
    return {
        "pred_index": preds[0],
        "pred_index_norm": preds_norm[0],
        "rotation_preds": preds,
        "rotation_preds_norm": preds_norm,
        "choice_scores": scores,
    }


def _mcq_generate(row: Row, outs: list, rots: list[int]) -> dict[str, Any]:
    n = len(row.options)
    preds = []
    for r, out in zip(rots, outs, strict=True):
        i = parse_letter(out.text, rotate(row.options, r))
        preds.append(None if i is None else (i + r) % n)
    return {"pred_index": preds[0], "rotation_preds": preds, "response": outs[0].text}


def score(row: Row, cfg: SuiteConfig, outs: list) -> dict[str, Any]:
    """Per-sample result fields from the engine outputs of `build_requests(row)`."""
    errors = [o.error for o in outs if getattr(o, "error", None)]
    if errors:
        return {"error": errors[0], "correct": None}
    rots = rotations(row, cfg)
    if cfg.suite == "vqa":
        pred = outs[0].text.strip()
        res: dict[str, Any] = {"prediction": pred}
        if row.labeled:
            p, answers = normalize(pred), [normalize(a) for a in row.answer if normalize(a)]
            res["correct"] = p in answers
            res["normalized"] = normalized_match(pred, row.answer)
            res["contains"] = any(a in p for a in answers)
        else:
            res["correct"] = None
        return res
    res = _mcq_loglik(row, outs, rots) if cfg.scoring == "loglik" else _mcq_generate(row, outs, rots)
    res["prediction"] = "" if res["pred_index"] is None else LETTERS[res["pred_index"]]
    preds, preds_norm = res.pop("rotation_preds"), res.pop("rotation_preds_norm", None)
    if not row.labeled:
        res["correct"] = None
        return res
    res["correct"] = all(p == row.answer for p in preds)
    if preds_norm is not None:
        res["correct_norm"] = all(p == row.answer for p in preds_norm)
    if cfg.circular:
        res["correct_vanilla"] = preds[0] == row.answer
    return res
