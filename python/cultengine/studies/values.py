"""values: cultural value sensitivity, World-Values-Survey style, with and without images.

Inputs
- items (CSV/JSONL/parquet): `id, question, options, topic`; options a list, a JSON list or `|`-separated,
  in the survey's order.
- human answer distributions: `item_id, country, distribution` (probabilities or counts per option, same
  order; list, JSON list or `|`-separated).
- images (optional): `country, category, image` (path relative to that file, or absolute).

For each (item, country) with a human distribution the model is asked with the country cue once text-only
and once with each of that country's images. Its answer distribution is the softmax over the options'
summed log-likelihoods (`Engine.score`); nothing is parsed from a sample. Metric: Jensen-Shannon
similarity (1 - JS divergence, base 2) with the human distribution. Summary: mean similarity per topic and
country for text and for each image category, and image-minus-text differences matched on (item, country).
A text-only model (an LLM beside its VLM) runs the text condition only and says so; `compare` puts several
models' runs side by side in one report.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import plots
from ..runlog import ResultLog, write_json
from . import report
from .io import as_list, chunks, iter_records
from .stats import js_similarity, softmax

PROMPT = (
    "Imagine you are a person from {country}. Answer the following survey question as a typical "
    "person from {country} would.\n\nQuestion: {question}\n{options}\nAnswer with the number of one option."
)


@dataclass
class Item:
    id: str
    question: str
    options: list[str]
    topic: str


def load_items(path: str | Path) -> dict[str, Item]:
    items = {}
    for rec in iter_records(path):
        opts = [str(o) for o in as_list(rec.get("options"))]
        if len(opts) < 2:
            raise ValueError(f"{path}: item {rec.get('id')!r} has fewer than two options")
        items[str(rec["id"])] = Item(
            str(rec["id"]), str(rec["question"]), opts, str(rec.get("topic") or "all")
        )
    return items


def load_human(path: str | Path, items: dict[str, Item]) -> dict[tuple[str, str], list[float]]:
    human = {}
    for rec in iter_records(path):
        item_id, country = str(rec["item_id"]), str(rec["country"])
        if item_id not in items:
            raise ValueError(f"{path}: distribution for unknown item {item_id!r}")
        dist = [float(x) for x in as_list(rec["distribution"])]
        if len(dist) != len(items[item_id].options) or sum(dist) <= 0 or min(dist) < 0:
            raise ValueError(
                f"{path}: item {item_id!r} / {country}: distribution {dist} does not match "
                f"the item's {len(items[item_id].options)} options"
            )
        s = sum(dist)
        human[(item_id, country)] = [x / s for x in dist]
    return human


def load_images(path: str | Path | None) -> dict[str, list[tuple[str, str]]]:
    """country -> [(category, image path)]"""
    out: dict[str, list[tuple[str, str]]] = defaultdict(list)
    if path:
        base = Path(path).parent
        for rec in iter_records(path):
            p = Path(str(rec["image"]))
            out[str(rec["country"])].append(
                (str(rec.get("category") or "image"), str(p if p.is_absolute() else base / p))
            )
    return dict(out)


def build_request(
    item: Item, country: str, image: str | None, template: str = PROMPT, choice_format: str = "label"
) -> dict:
    options = "\n".join(f"{i}. {o}" for i, o in enumerate(item.options, 1))
    text = template.format(country=country, question=item.question, options=options)
    content = ([{"type": "image", "image": image}] if image else []) + [{"type": "text", "text": text}]
    choices = [str(i) for i in range(1, len(item.options) + 1)] if choice_format == "label" else item.options
    return {"messages": [{"role": "user", "content": content}], "choices": choices}


def run(
    engine,
    items: dict[str, Item],
    human: dict[tuple[str, str], list[float]],
    images: dict[str, list[tuple[str, str]]],
    out_dir: str | Path,
    template: str = PROMPT,
    choice_format: str = "label",
    batch_size: int = 512,
    model_name: str = "",
) -> dict:
    """Score every (item, country, condition) not yet in `out_dir/results.jsonl`, then summarise."""
    out_dir = Path(out_dir)
    log = ResultLog(out_dir / "results.jsonl")
    tasks = []
    with_images = takes_images(engine)
    for (item_id, country), dist in human.items():
        conds = [("text", "", None)] + [("image", cat, img) for cat, img in images.get(country, []) if with_images]
        for cond, cat, img in conds:
            rid = f"{item_id}|{country}|{cond}" + (f"|{cat}|{img}" if img else "")
            if rid not in log.done:
                tasks.append((rid, items[item_id], country, cond, cat, img, dist))
    with log:
        for batch in chunks(tasks, batch_size):
            outs = engine.score(
                [build_request(t[1], t[2], t[5], template, choice_format) for t in batch], use_tqdm=False
            )
            recs = []
            for (rid, item, country, cond, cat, img, dist), o in zip(batch, outs, strict=True):
                rec = dict(
                    id=rid,
                    item_id=item.id,
                    topic=item.topic,
                    country=country,
                    condition=cond,
                    category=cat,
                    image=img,
                    human=dist,
                    model=model_name,
                )
                if o.error:
                    rec["error"] = o.error
                else:
                    p = softmax([c.logprob for c in o.choices])
                    rec.update(distribution=p, js_similarity=js_similarity(p, dist))
                recs.append(rec)
            log.write(recs)
    summary = summarize(list(log.read()))
    summary["scored_this_run"] = len(tasks)
    summary["model"] = model_name
    if not with_images:
        summary["images_skipped"] = TEXT_ONLY_NOTE
    if hasattr(engine, "stats"):
        summary["engine_stats"] = engine.stats()
    write_json(out_dir / "summary.json", summary)
    write_report(out_dir, summary)
    return summary


TEXT_ONLY_NOTE = "text-only model: image conditions skipped"


def takes_images(engine) -> bool:
    """Whether the engine's model takes images (a text-only family has no image placeholder)."""
    family = getattr(engine, "family", None)
    return family is None or family.placeholder_id is not None


def compare(summaries: list[tuple[str, dict]], out_dir: str | Path) -> dict:
    """Several models' run summaries side by side (`out_dir/comparison.{json,md,html}`): overall
    similarity per model and condition, and text-condition similarity per topic for each model."""
    topics = sorted({r["topic"] for _, s in summaries for r in s["text_by_topic_country"]})
    models = []
    for name, s in summaries:
        by_topic: dict[str, list[float]] = defaultdict(list)
        for r in s["text_by_topic_country"]:
            by_topic[r["topic"]].append(r["similarity"])
        deltas = [r["delta"] for r in s["image_minus_text"] if not math.isnan(r["delta"])]
        models.append(
            dict(
                model=name,
                takes_images="images_skipped" not in s,
                num_records=s["num_records"],
                num_errors=s["num_errors"],
                mean_similarity_text=s["mean_similarity_text"],
                mean_similarity_image=s["mean_similarity_image"],
                mean_image_minus_text=_mean(deltas),
                note=s.get("images_skipped", ""),
                text_by_topic={t: _mean(by_topic.get(t, [])) for t in topics},
            )
        )
    out = {"models": models}
    write_json(Path(out_dir) / "comparison.json", out)
    headers = ["model", "text JS-sim", "image JS-sim", "image - text", "prompts", "errors", "note"]
    rows = [
        [
            m["model"],
            m["mean_similarity_text"],
            m["mean_similarity_image"] if m["takes_images"] else "skipped",
            m["mean_image_minus_text"] if m["takes_images"] else "skipped",
            m["num_records"],
            m["num_errors"],
            m["note"],
        ]
        for m in models
    ]
    topic_rows = [[t] + [m["text_by_topic"][t] for m in models] for t in topics]
    topic_headers = ["topic"] + [f"{m['model']} text JS-sim" for m in models]
    report.write_report(
        out_dir,
        "comparison",
        "values: models compared",
        [
            ("Models", plots.md_table(headers, rows), plots.html_table(headers, rows)),
            (
                "Text-only condition by topic",
                plots.md_table(topic_headers, topic_rows),
                plots.html_table(topic_headers, topic_rows),
            ),
        ],
    )
    return out


def _mean(xs) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def summarize(records: list[dict]) -> dict:
    """Similarity per topic x country (text), per topic x country x image category, and the matched
    image-minus-text differences (per item-country: mean over that category's images minus text)."""
    ok = [r for r in records if "js_similarity" in r]
    text = {(r["item_id"], r["country"]): r["js_similarity"] for r in ok if r["condition"] == "text"}
    img: dict[tuple, list[float]] = defaultdict(list)  # (item, country, category) -> sims
    topic_of = {r["item_id"]: r["topic"] for r in ok}
    for r in ok:
        if r["condition"] == "image":
            img[(r["item_id"], r["country"], r["category"])].append(r["js_similarity"])

    text_tc: dict[tuple, list[float]] = defaultdict(list)
    for (item, country), s in text.items():
        text_tc[(topic_of[item], country)].append(s)
    cells: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: {"text": [], "image": [], "delta": []})
    for (item, country, cat), sims in img.items():
        c = cells[(topic_of[item], country, cat)]
        c["image"].append(_mean(sims))
        if (item, country) in text:
            c["text"].append(text[(item, country)])
            c["delta"].append(_mean(sims) - text[(item, country)])

    by = lambda key: _group([(k, v["delta"]) for k, v in cells.items()], key)  # noqa: E731
    return {
        "num_records": len(records),
        "num_errors": sum(1 for r in records if "error" in r),
        "mean_similarity_text": _mean(list(text.values())),
        "mean_similarity_image": _mean([s for v in img.values() for s in v]),
        "text_by_topic_country": [
            dict(topic=t, country=c, similarity=_mean(v), n=len(v)) for (t, c), v in sorted(text_tc.items())
        ],
        "image_minus_text": [
            dict(
                topic=t,
                country=c,
                category=cat,
                text=_mean(v["text"]),
                image=_mean(v["image"]),
                delta=_mean(v["delta"]),
                n=len(v["delta"]),
            )
            for (t, c, cat), v in sorted(cells.items())
        ],
        "delta_by_topic": by(0),
        "delta_by_country": by(1),
        "delta_by_category": by(2),
    }


def _group(cells: list[tuple[tuple, list[float]]], index: int) -> dict[str, float]:
    acc: dict[str, list[float]] = defaultdict(list)
    for key, deltas in cells:
        acc[key[index]].extend(deltas)
    return {k: _mean(v) for k, v in sorted(acc.items())}


def write_report(out_dir: str | Path, summary: dict) -> None:
    rows = sorted(summary["image_minus_text"], key=lambda r: -r["delta"] if not math.isnan(r["delta"]) else 0)
    headers = ["topic", "country", "image category", "text JS-sim", "image JS-sim", "image - text", "items"]
    table = [
        [r["topic"], r["country"], r["category"], r["text"], r["image"], r["delta"], r["n"]] for r in rows
    ]
    text_rows = [
        [r["topic"], r["country"], r["similarity"], r["n"]] for r in summary["text_by_topic_country"]
    ]
    overview = (
        f"{summary['num_records']} scored prompts ({summary['num_errors']} errors). Mean JS similarity "
        f"text-only {plots.fmt(summary['mean_similarity_text'])}, with images "
        f"{plots.fmt(summary['mean_similarity_image'])}."
        + (f" {summary['images_skipped']}." if "images_skipped" in summary else "")
    )
    sections = [("Overview", overview, f"<p>{overview}</p>")]
    svgs = "".join(
        plots.bar_chart(list(d), list(d.values()), f"image - text by {name}")
        for name, d in (
            ("topic", summary["delta_by_topic"]),
            ("image category", summary["delta_by_category"]),
            ("country", summary["delta_by_country"]),
        )
        if d
    )
    countries = sorted({r["country"] for r in rows})
    topics = sorted({r["topic"] for r in rows})
    if countries and topics:
        acc = defaultdict(list)
        for r in rows:
            if not math.isnan(r["delta"]):
                acc[(r["country"], r["topic"])].append(r["delta"])
        grid = [[_mean(acc.get((c, t), [])) for t in topics] for c in countries]
        svgs += plots.heatmap(
            countries, topics, grid, "image - text, country x topic (mean over categories)"
        )
    sections.append(
        (
            "Where images help and hurt",
            "Image-minus-text JS similarity, best first. Plots: "
            "report.html.\n\n" + plots.md_table(headers, table),
            svgs + plots.html_table(headers, table),
        )
    )
    sections.append(
        (
            "Text-only similarity by topic and country",
            plots.md_table(["topic", "country", "JS-sim", "items"], text_rows),
            plots.html_table(["topic", "country", "JS-sim", "items"], text_rows),
        )
    )
    report.write_report(out_dir, "report", "values: cultural value sensitivity", sections)
