"""The embedded default benchmark: flag images drawn by code + multiple-choice questions about them.

Per flag: which country's flag (image recognition), a scene question about its shapes or stripes
(scene understanding), and text-only capital and currency questions (cultural knowledge).
Distractors and answer positions come from a fixed seed, so the file is identical on every machine.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .. import countries
from ..rows import LETTERS
from .flags import FLAGS, Flag, draw

VERSION = 1
SEED = 1234
SHAPES = ["circle", "star", "cross", "triangle", "crescent", "diamond", "diagonal cross", "rectangle"]
NUMBERS = dict(enumerate("zero one two three four five six seven eight nine ten".split()))


def _mcq(rng: random.Random, answer: str, pool: list[str], k: int = 4) -> tuple[list[str], str]:
    distractors = rng.sample(sorted({p for p in pool if p != answer}), k - 1)
    options = [answer, *distractors]
    rng.shuffle(options)
    return options, LETTERS[options.index(answer)]


def _scene(flag: Flag, rng: random.Random) -> tuple[str, list[str], str]:
    stripes = flag.stripes
    if stripes:
        orient, n = stripes
        other = "vertical" if orient == "horizontal" else "horizontal"
        answer = f"{NUMBERS[n]} {orient} stripes"
        alts = [
            f"{NUMBERS[n]} {other} stripes",
            f"{NUMBERS[n + 1]} {orient} stripes",
            "a cross on a plain field",
            "a single circle on a plain field",
        ]
        options, letter = _mcq(rng, answer, alts)
        return "How is this flag laid out?", options, letter
    shape = next(s for s in SHAPES if s in flag.shapes)  # the most telling one
    options, letter = _mcq(rng, shape, [s for s in SHAPES if s not in flag.shapes])
    return "Which of these shapes appears on this flag?", options, letter


def rows() -> list[dict]:
    rng = random.Random(SEED)
    names = [f.country for f in FLAGS]
    out = []
    for flag in FLAGS:
        c = countries.lookup(flag.country)
        assert c is not None, flag.country
        base = {"country": c.name, "language": "English", "split": "test"}
        img = [f"images/{c.iso3.lower()}.png"]
        opts, ans = _mcq(rng, flag.country, names)
        out.append(
            {
                "id": f"flag-{c.iso3}",
                "images": img,
                "question": "Which country's flag is this?",
                "options": opts,
                "answer": ans,
                "category": "flags",
                "question_type": "image_recognition",
                **base,
            }
        )
        q, opts, ans = _scene(flag, rng)
        out.append(
            {
                "id": f"shape-{c.iso3}",
                "images": img,
                "question": q,
                "options": opts,
                "answer": ans,
                "category": "symbols",
                "question_type": "scene_understanding",
                **base,
            }
        )
        opts, ans = _mcq(rng, flag.capital, [f.capital for f in FLAGS])
        out.append(
            {
                "id": f"capital-{c.iso3}",
                "question": f"What is the capital of {flag.country}?",
                "options": opts,
                "answer": ans,
                "category": "geography",
                "question_type": "cultural_knowledge",
                **base,
            }
        )
        opts, ans = _mcq(rng, flag.currency, [f.currency for f in FLAGS])
        out.append(
            {
                "id": f"currency-{c.iso3}",
                "question": f"Which currency is used in {flag.country}?",
                "options": opts,
                "answer": ans,
                "category": "economy",
                "question_type": "cultural_knowledge",
                **base,
            }
        )
    return out


def build(directory: Path) -> Path:
    """Write images/ and bench.jsonl under `directory` (once); returns the JSONL path."""
    path = directory / "bench.jsonl"
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "images").mkdir(exist_ok=True)
    for flag in FLAGS:
        iso3 = countries.lookup(flag.country).iso3.lower()
        draw(flag).save(directory / "images" / f"{iso3}.png", optimize=False)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows()), encoding="utf-8")
    tmp.replace(path)  # last, so a half-built directory is rebuilt next time
    return path


def corpus() -> list[str]:
    """Every text the benchmark prompts contain (for training the demo tokenizer)."""
    texts = []
    for r in rows():
        texts += [r["question"], *r["options"]]
    return texts
