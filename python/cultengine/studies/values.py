"""values: cultural value sensitivity, World-Values-Survey style, with and without images.

Inputs
- items (CSV/JSONL/parquet): `id, question, options, topic`; options a list, a JSON list or `|`-separated,
  in the survey's order.
- human answer distributions: `item_id, country, distribution` (probabilities or counts per option, same
  order; list, JSON list or `|`-separated).
- images (optional): `country, category, image` (a path relative to that file, inside its folder; elsewhere
  only under a folder the user allows, `--allowed-local-media-path`).

For each (item, country) with a human distribution the model is asked with the country cue once text-only
and once with each of that country's images. Its answer distribution is the softmax over the options'
summed log-likelihoods (`Engine.score`); nothing is parsed from a sample. Metric: Jensen-Shannon
similarity (1 - JS divergence, base 2) with the human distribution. Summary: mean similarity per topic and
country for text and for each image category, and image-minus-text differences matched on (item, country).
A text-only model (an LLM beside its VLM) runs the text condition only and says so.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import plots, provenance
from ..console import bar, resume_note
from ..paths import named_by_data_file
from ..runlog import ResultLog, write_json
from ..stats import cluster_mean
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
        if str(rec["id"]) in items:  # a second item under one id would silently replace the first
            raise ValueError(f"{path}: item id {str(rec['id'])!r} appears twice; item ids must be unique")
        items[str(rec["id"])] = Item(str(rec["id"]), str(rec["question"]), opts, str(rec.get("topic") or "all"))
    return items


def load_human(path: str | Path, items: dict[str, Item]) -> dict[tuple[str, str], list[float]]:
    human = {}
    for rec in iter_records(path):
        item_id, country = str(rec["item_id"]), str(rec["country"])
        if item_id not in items:
            raise ValueError(f"{path}: distribution for unknown item {item_id!r}")
        if (item_id, country) in human:
            raise ValueError(f"{path}: item {item_id!r} / {country}: a second distribution (one per item and country)")
        dist = [float(x) for x in as_list(rec["distribution"])]
        if not all(map(math.isfinite, dist)):  # NaN would pass the checks below and poison every summary
            raise ValueError(f"{path}: item {item_id!r} / {country}: distribution {dist} holds NaN or infinity")
        if len(dist) != len(items[item_id].options) or sum(dist) <= 0 or min(dist) < 0:
            raise ValueError(
                f"{path}: item {item_id!r} / {country}: distribution {dist} does not match "
                f"the item's {len(items[item_id].options)} options"
            )
        s = sum(dist)
        human[(item_id, country)] = [x / s for x in dist]
    return human


def load_images(path: str | Path | None, media_root: str | Path | None = None) -> dict[str, list[tuple[str, str]]]:
    """country -> [(category, image path)]; each path inside the file's folder or under `media_root`."""
    out: dict[str, list[tuple[str, str]]] = defaultdict(list)
    if path:
        for n, rec in enumerate(iter_records(path), 1):
            try:
                image = named_by_data_file(path, str(rec["image"]), media_root)
            except ValueError as e:
                raise ValueError(f"{path}: row {n}: image {e}") from None
            out[str(rec["country"])].append((str(rec.get("category") or "image"), str(image)))
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
    model_path: str | Path | None = None,
    data_files: Sequence[str | Path] = (),
    quiet: bool = False,
) -> dict:
    """Score every (item, country, condition) not yet in `out_dir/results.jsonl` (flushed after every batch of
    `batch_size`, with a progress bar on a terminal unless `quiet`), then summarise."""
    out_dir = Path(out_dir)
    log = ResultLog(out_dir / "results.jsonl")
    tasks, total = [], 0
    with_images = takes_images(engine)
    for (item_id, country), dist in human.items():
        conds = [("text", "", None)] + [("image", cat, img) for cat, img in images.get(country, []) if with_images]
        for cond, cat, img in conds:
            rid = f"{item_id}|{country}|{cond}" + (f"|{cat}|{img}" if img else "")
            total += 1
            if rid not in log.done:
                tasks.append((rid, items[item_id], country, cond, cat, img, dist))
    resume_note(total - len(tasks), total, "prompts")
    with log, bar(total, initial=total - len(tasks), unit="prompt", desc="values", quiet=quiet) as progress:
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
            progress.update(len(recs))
    summary = summarize(list(log.read()))
    summary["scored_this_run"] = len(tasks)
    summary["demo"] = provenance.is_demo(model_name) or provenance.is_demo(model_path)
    if not with_images:
        summary["images_skipped"] = TEXT_ONLY_NOTE
    if hasattr(engine, "stats"):
        summary["engine_stats"] = engine.stats()
    summary["run"] = provenance.collect(model=model_path, data=data_files, engine=engine)
    write_json(out_dir / "summary.json", summary)
    write_report(out_dir, summary)
    return summary


TEXT_ONLY_NOTE = "text-only model: image conditions skipped"


def takes_images(engine) -> bool:
    """Whether the engine's model takes images (a text-only family has no image placeholder)."""
    family = getattr(engine, "family", None)
    return family is None or family.placeholder_id is not None


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
    text_items: dict[tuple, list[str]] = defaultdict(list)
    for (item, country), s in text.items():
        text_tc[(topic_of[item], country)].append(s)
        text_items[(topic_of[item], country)].append(item)
    cells: dict[tuple, dict[str, list]] = defaultdict(lambda: {"text": [], "image": [], "delta": [], "items": []})
    for (item, country, cat), sims in img.items():
        c = cells[(topic_of[item], country, cat)]
        c["image"].append(_mean(sims))
        if (item, country) in text:
            c["text"].append(text[(item, country)])
            c["delta"].append(_mean(sims) - text[(item, country)])
            c["items"].append(item)

    by = lambda key: _group(cells, key)  # noqa: E731
    every = [(d, i) for v in cells.values() for d, i in zip(v["delta"], v["items"], strict=True)]
    return {
        "num_records": len(records),
        "num_errors": sum(1 for r in records if "error" in r),
        "mean_similarity_text": _mean(list(text.values())),
        "mean_similarity_image": _mean([s for v in img.values() for s in v]),
        "similarity_text": _delta_estimate(list(text.values()), [item for item, _ in text]),
        "similarity_image": _delta_estimate(
            [s for v in img.values() for s in v], [k[0] for k, v in img.items() for _ in v]
        ),
        "text_by_topic_country": [
            dict(topic=t, country=c, similarity=_mean(v), **_interval(v, text_items[(t, c)]), n=len(v))
            for (t, c), v in sorted(text_tc.items())
        ],
        "image_minus_text": [
            dict(
                topic=t,
                country=c,
                category=cat,
                text=_mean(v["text"]),
                image=_mean(v["image"]),
                delta=_mean(v["delta"]),
                **_interval(v["delta"], v["items"]),
                n=len(v["delta"]),
            )
            for (t, c, cat), v in sorted(cells.items())
        ],
        "image_minus_text_overall": _delta_estimate([d for d, _ in every], [i for _, i in every]),
        "interval_method": "image-minus-text differences are paired on (item, country); 95 % cluster-bootstrap "
        "interval resampling items (2,000 resamples), p from a sign-flip permutation test over items "
        "(9,999 permutations) of mean difference = 0",
        "delta_by_topic": by(0),
        "delta_by_country": by(1),
        "delta_by_category": by(2),
    }


def _delta_estimate(deltas: list[float], items: list[str]) -> dict:
    """The mean (of paired differences, or of similarities) with its item-cluster bootstrap interval and the
    sign-flip p-value of mean = 0 (meaningful for differences only)."""
    return cluster_mean(deltas, items).as_dict() if deltas else {"value": float("nan"), "n": 0}


def _interval(deltas: list[float], items: list[str]) -> dict:
    est = _delta_estimate(deltas, items)
    return {"low": est.get("low", float("nan")), "high": est.get("high", float("nan")), "p": est.get("p")}


def _group(cells: dict[tuple, dict[str, list]], index: int) -> dict[str, dict]:
    """Key part -> the paired difference estimate over every (item, country, category) cell sharing it."""
    deltas: dict[str, list[float]] = defaultdict(list)
    items: dict[str, list[str]] = defaultdict(list)
    for key, v in cells.items():
        deltas[key[index]].extend(v["delta"])
        items[key[index]].extend(v["items"])
    return {k: _delta_estimate(deltas[k], items[k]) for k in sorted(deltas)}


def write_report(out_dir: str | Path, summary: dict) -> None:
    rows = sorted(summary["image_minus_text"], key=lambda r: -r["delta"] if not math.isnan(r["delta"]) else 0)
    headers = [
        "topic",
        "country",
        "image category",
        "text JS-sim",
        "image JS-sim",
        "image - text",
        "95% CI",
        "p",
        "items",
    ]
    table = [
        [r["topic"], r["country"], r["category"], r["text"], r["image"], r["delta"], _ci_text(r), r.get("p"), r["n"]]
        for r in rows
    ]
    text_rows = [
        [r["topic"], r["country"], r["similarity"], _ci_text(r), r["n"]] for r in summary["text_by_topic_country"]
    ]
    overview = (
        f"{summary['num_records']} scored prompts ({summary['num_errors']} errors). Mean JS similarity "
        f"text-only {_est_text(summary.get('similarity_text'), summary['mean_similarity_text'])}, with images "
        f"{_est_text(summary.get('similarity_image'), summary['mean_similarity_image'])}."
        + (f" {summary['images_skipped']}." if "images_skipped" in summary else "")
    )
    overall = summary.get("image_minus_text_overall", {})
    if overall.get("n"):
        test = f"p = {plots.fmt(overall['p'])}" if overall.get("p") is not None else "one item: no interval or test"
        overview += (
            f" Image minus text, paired on (item, country): {_est_text(overall, overall['value'])}, {test}, "
            f"n = {overall['n']} over {overall.get('clusters')} items."
        )
    method = summary.get("interval_method", "")
    sections = [("Overview", f"{overview}\n\n{method}.", f"<p>{overview}</p><p>{method}.</p>")]
    topic_rows = [[k, v["value"], _ci_text(v), v.get("p"), v["n"]] for k, v in summary["delta_by_topic"].items()]
    topic_h = ["topic", "image - text", "95% CI", "p", "pairs"]
    topic_md, topic_html = plots.md_table(topic_h, topic_rows), plots.html_table(topic_h, topic_rows)
    sections.append(("Image minus text by topic (paired over items)", topic_md, topic_html))
    svgs = "".join(
        plots.bar_chart(
            list(d),
            [v["value"] for v in d.values()],
            f"image - text by {name} (95 % CI)",
            counts=[v["n"] for v in d.values()],
            intervals=[(v.get("low"), v.get("high")) for v in d.values()],
        )
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
        svgs += plots.heatmap(countries, topics, grid, "image - text, country x topic (mean over categories)")
    sections.append(
        (
            "Where images help and hurt",
            "Image-minus-text JS similarity, best first. Plots: report.html.\n\n" + plots.md_table(headers, table),
            svgs + plots.html_table(headers, table),
        )
    )
    sections.append(
        (
            "Text-only similarity by topic and country",
            plots.md_table(["topic", "country", "JS-sim", "95% CI", "items"], text_rows),
            plots.html_table(["topic", "country", "JS-sim", "95% CI", "items"], text_rows),
        )
    )
    notes = [report.DEMO_NOTE] if summary.get("demo") else []
    report.write_report(out_dir, "report", "values: cultural value sensitivity", sections, notes, summary.get("run"))


def _est_text(est: dict | None, value: float) -> str:
    ci = _ci_text(est) if est else "-"
    return plots.fmt(value) if ci == "-" else f"{plots.fmt(value)} {ci}"


def _ci_text(est: dict) -> str:
    low, high = est.get("low"), est.get("high")
    if low is None or high is None or math.isnan(low):
        return "-"
    return f"[{plots.fmt(low)}, {plots.fmt(high)}]"
