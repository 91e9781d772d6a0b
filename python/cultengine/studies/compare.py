"""`cultengine compare` for study runs: values (paired over the same prompts) and stories (alignment tests).

values: each model's mean Jensen-Shannon similarity to the human distributions, text-only and with images,
overall and per topic, with 95 % item-cluster bootstrap intervals; per pair of models and group the paired
difference on the same (item, country, condition) prompts: item-cluster bootstrap interval, sign-flip
permutation p over items, Holm's adjustment over the groups of the pair; and each model's image-minus-text
difference with its paired interval (from its own summary).

stories: each model's Kendall tau between story similarity and cultural distance with its Mantel p, and the
lexical ANOVAs with their effect sizes (from `analysis.json`: run `cultengine analyze stories` first). The
taus of two models are not tested against each other (no paired test of two Mantel statistics is made).
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from itertools import combinations
from pathlib import Path
from typing import Any

from .. import plots, provenance, stats
from ..runlog import Incomparable, read
from .report import DEMO_NOTE

STORY_CONFIG = ("concepts", "nationalities", "temperatures", "samples", "max_tokens", "top_p", "seed", "template")


def _hashes(summary: dict) -> dict[str, str] | None:
    data = summary.get("run", {}).get("data")
    if not data or any(d.get("sha256") is None for d in data):
        return None
    return {Path(d["file"]).name: d["sha256"] for d in data}


def _names(paths: list[Path], models: list[str]) -> list[str]:
    return [f"{m} ({p.name})" if models.count(m) > 1 else m for m, p in zip(models, paths, strict=True)]


# ------------------------------------------------------------------------------------------------ values
def compare_values(run_dirs: list[Path]) -> dict[str, Any]:
    summaries = [json.loads((d / "summary.json").read_text(encoding="utf-8")) for d in run_dirs]
    records = [{r["id"]: r for r in read(d / "results.jsonl") if "js_similarity" in r} for d in run_dirs]
    # A text-only model (an LLM beside its VLM) has no image prompts: every model is compared on the text ones.
    text_only = any(s.get("images_skipped") for s in summaries)
    if text_only:
        records = [{i: r for i, r in recs.items() if r["condition"] == "text"} for recs in records]
    ref = run_dirs[0]
    for d, s, recs in zip(run_dirs[1:], summaries[1:], records[1:], strict=True):
        a, b = _hashes(summaries[0]), _hashes(s)
        if a is not None and b is not None and sorted(a.values()) != sorted(b.values()):
            raise Incomparable(f"{ref} and {d} used different inputs: {sorted(a.items())} vs {sorted(b.items())}")
        only_a, only_b = records[0].keys() - recs.keys(), recs.keys() - records[0].keys()
        if only_a or only_b:
            raise Incomparable(
                f"{ref} and {d} hold different prompts: {len(only_a)} only in the first "
                f"({', '.join(sorted(only_a)[:3])}), {len(only_b)} only in the second "
                f"({', '.join(sorted(only_b)[:3])})"
            )
    models = [
        next((r.get("model") for r in recs.values() if r.get("model")), d.name)
        for d, recs in zip(run_dirs, records, strict=True)
    ]
    names = _names(run_dirs, models)
    order = sorted(records[0])
    groups: dict[str, list[str]] = defaultdict(list)
    for rid in order:
        r = records[0][rid]
        groups[f"{r['condition']}|all"].append(rid)
        groups[f"{r['condition']}|{r['topic']}"].append(rid)
    groups = dict(sorted(groups.items()))
    table = {
        n: {
            g: stats.cluster_mean([recs[i]["js_similarity"] for i in ids], [recs[i]["item_id"] for i in ids]).as_dict()
            for g, ids in groups.items()
        }
        for n, recs in zip(names, records, strict=True)
    }
    pairs = []
    for (a, ra), (b, rb) in combinations(zip(names, records, strict=True), 2):
        tests = []
        for g, ids in groups.items():
            est = stats.cluster_mean(
                [ra[i]["js_similarity"] - rb[i]["js_similarity"] for i in ids], [ra[i]["item_id"] for i in ids]
            )
            tests.append({"group": g, **est.as_dict(), "test": "item-cluster sign-flip permutation"})
        for t, adj in zip(tests, stats.holm([t.get("p", 1.0) for t in tests]), strict=True):
            t["p_holm"] = round(adj, 6)
        pairs.append({"a": a, "b": b, "tests": tests})
    return {
        "kind": "values",
        "metric": "js_similarity",
        "models": names,
        "runs": [str(d) for d in run_dirs],
        "demo": [n for n, s in zip(names, summaries, strict=True) if s.get("demo")],
        "text_only": [n for n, s in zip(names, summaries, strict=True) if s.get("images_skipped")],
        "prompts": len(order),
        "table": table,
        "image_minus_text": {
            n: {"overall": s.get("image_minus_text_overall"), "by_topic": s.get("delta_by_topic")}
            for n, s in zip(names, summaries, strict=True)
        },
        "paired": pairs,
        "methods": [
            "Mean Jensen-Shannon similarity (1 - JS divergence, base 2) to the human answer distributions; 95 % "
            "cluster-bootstrap interval resampling survey items (2,000 resamples).",
            "Paired model differences on the same (item, country, condition) prompts: item-cluster bootstrap "
            "interval; p from a sign-flip permutation test over items (9,999 permutations); p_holm: Holm's "
            "adjustment over the groups of one pair of models.",
            "Image minus text: each model's own paired difference (item, country), item-cluster bootstrap interval.",
        ],
        "run": provenance.collect(data=[d / "results.jsonl" for d in run_dirs]),
    }


def _est(e: dict | None) -> str:
    if not e or e.get("value") is None:
        return "-"
    if e.get("low") is None or e["low"] != e["low"]:
        return plots.fmt(e["value"])
    return f"{plots.fmt(e['value'])} [{plots.fmt(e['low'])}, {plots.fmt(e['high'])}]"


def values_markdown(result: dict) -> tuple[list[str], list[str]]:
    names = result["models"]
    head = [f"# cultengine compare (values): {len(names)} models, {result['prompts']} prompts", ""]
    head += [f"> {n}: {DEMO_NOTE}" for n in result["demo"]] + ([""] if result["demo"] else [])
    text_only = result.get("text_only") or []
    head += [f"> {n}: text-only model: image conditions skipped" for n in text_only]
    head += ["> every model is compared on the text-only prompts", ""] if text_only else []
    head += ["## Summary", ""]
    for n in names:
        head.append(
            f"- {n}: JS similarity text {_est(result['table'][n].get('text|all'))}, with images "
            f"{_est(result['table'][n].get('image|all'))}; image - text "
            f"{_est(result['image_minus_text'][n]['overall'])}"
        )
    head.append("")
    keys = list(result["table"][names[0]])
    rows = [
        [k.replace("|", ": "), result["table"][names[0]][k]["n"], *(_est(result["table"][n][k]) for n in names)]
        for k in keys
    ]
    tables = ["## JS similarity by condition and topic (95 % CI)", "", plots.md_table(["group", "n", *names], rows), ""]
    for pair in result["paired"]:
        h = ["group", "n", "A - B", "95% CI", "p", "p (Holm)"]
        prow = [
            [
                t["group"].replace("|", ": "),
                t["n"],
                t["value"],
                _est(t).partition(" ")[2] or "-",
                t.get("p"),
                t["p_holm"],
            ]
            for t in pair["tests"]
        ]
        tables += [f"## Paired: A = {pair['a']}, B = {pair['b']}", "", plots.md_table(h, prow), ""]
    topics = sorted({t for n in names for t in (result["image_minus_text"][n]["by_topic"] or {})})
    if topics:
        rows = [[t, *(_est((result["image_minus_text"][n]["by_topic"] or {}).get(t)) for n in names)] for t in topics]
        tables += [
            "## Image minus text by topic (paired over items, 95 % CI)",
            "",
            plots.md_table(["topic", *names], rows),
            "",
        ]
    tables += ["## Methods", ""] + [f"- {x}" for x in result["methods"]] + [""]
    return head, tables + provenance.markdown(result["run"])


def values_figures(result: dict) -> list[str]:
    names = result["models"]
    figs = []
    for cond in ("text", "image"):
        key = f"{cond}|all"
        ests = [result["table"][n].get(key) for n in names]
        if all(ests):
            ranked = sorted(zip(names, ests, strict=True), key=lambda t: -t[1]["value"])
            figs.append(
                plots.bar_chart(
                    [n for n, _ in ranked],
                    [e["value"] for _, e in ranked],
                    f"ranking: JS similarity, {cond} (95 % CI)",
                    counts=[e["n"] for _, e in ranked],
                    intervals=[(e.get("low"), e.get("high")) for _, e in ranked],
                )
            )
    return [f for f in figs if f]


def values_csv(result: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "condition", "topic", "n", "js_similarity", "ci_low", "ci_high"])
    for model, groups in result["table"].items():
        for key, e in groups.items():
            cond, _, topic = key.partition("|")
            w.writerow([model, cond, topic, e["n"], e["value"], e.get("low"), e.get("high")])
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ stories
def compare_stories(run_dirs: list[Path]) -> dict[str, Any]:
    configs = [json.loads((d / "config.json").read_text(encoding="utf-8")) for d in run_dirs]
    for d in run_dirs:
        if not (d / "analysis.json").exists():
            raise Incomparable(f"{d} has no analysis.json: run `cultengine analyze stories {d}` first")
    for d, c in zip(run_dirs[1:], configs[1:], strict=True):
        for key in STORY_CONFIG:
            if configs[0].get(key) != c.get(key):
                raise Incomparable(f"{run_dirs[0]} and {d} differ in {key}: {configs[0].get(key)!r} vs {c.get(key)!r}")
        a, b = ([Path(i).name for i in x.get("images", [])] for x in (configs[0], c))
        if a != b:
            raise Incomparable(f"{run_dirs[0]} and {d} differ in images: {a} vs {b}")
    analyses = [json.loads((d / "analysis.json").read_text(encoding="utf-8")) for d in run_dirs]
    entries = [(d, model, m) for d, an in zip(run_dirs, analyses, strict=True) for model, m in an["models"].items()]
    names = _names([d for d, _, _ in entries], [model for _, model, _ in entries])
    return {
        "kind": "stories",
        "models": names,
        "runs": [str(d) for d in run_dirs],
        "demo": [n for n, (_, _, m) in zip(names, entries, strict=True) if m.get("demo")],
        "alignment": {n: m["alignment"] for n, (_, _, m) in zip(names, entries, strict=True)},
        "lexical": {
            n: {k: v["anova"] for k, v in m["lexical"].items()} for n, (_, _, m) in zip(names, entries, strict=True)
        },
        "stories": {n: m["num_stories"] for n, (_, _, m) in zip(names, entries, strict=True)},
        "methods": [
            analyses[0].get("alignment_test", "Kendall tau-b with a Mantel permutation test"),
            analyses[0].get("anova", "one-way ANOVA across nationalities"),
            "The taus of different models are not tested against each other.",
        ],
        "run": provenance.collect(data=[d / "analysis.json" for d in run_dirs]),
    }


def stories_markdown(result: dict) -> tuple[list[str], list[str]]:
    names = result["models"]
    head = [f"# cultengine compare (stories): {len(names)} models", ""]
    head += [f"> {n}: {DEMO_NOTE}" for n in result["demo"]] + ([""] if result["demo"] else [])
    head += ["## Summary", ""]
    for n in names:
        parts = [
            f"{a['table']} tau {plots.fmt(a['tau'])} (Mantel p {plots.fmt(a['p'])}, {a['pairs']} pairs)"
            for a in result["alignment"][n]
        ]
        head.append(f"- {n} ({result['stories'][n]} stories): " + ("; ".join(parts) or "no culture table"))
    head.append("")
    rows = [
        [n, a["table"], a["tau"], a["p"], a.get("permutations"), a["pairs"], a["countries"]]
        for n in names
        for a in result["alignment"][n]
    ]
    h = ["model", "culture table", "Kendall tau-b", "Mantel p", "permutations", "pairs", "countries"]
    tables = ["## Cultural alignment", "", plots.md_table(h, rows), ""]
    rows = [
        [n, k, v.get("f"), v.get("p"), v.get("eta_squared"), v.get("omega_squared")]
        for n in names
        for k, v in result["lexical"][n].items()
    ]
    tables += [
        "## Lexical adaptation (one-way ANOVA)",
        "",
        plots.md_table(["model", "feature", "F", "p", "eta^2", "omega^2"], rows),
        "",
    ]
    tables += ["## Methods", ""] + [f"- {x}" for x in result["methods"]] + [""]
    return head, tables + provenance.markdown(result["run"])


def stories_figures(result: dict) -> list[str]:
    figs = []
    tables = sorted({a["table"] for v in result["alignment"].values() for a in v})
    for t in tables:
        rows = [(n, a) for n in result["models"] for a in result["alignment"][n] if a["table"] == t]
        figs.append(
            plots.bar_chart(
                [f"{n} (p {plots.fmt(a['p'])})" for n, a in rows],
                [a["tau"] for _, a in rows],
                f"Kendall tau: story similarity vs {t} distance (Mantel p per model)",
            )
        )
    return [f for f in figs if f]


def stories_csv(result: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "culture_table", "kendall_tau_b", "mantel_p", "permutations", "pairs", "countries"])
    for n, rows in result["alignment"].items():
        for a in rows:
            w.writerow([n, a["table"], a["tau"], a["p"], a.get("permutations"), a["pairs"], a["countries"]])
    return buf.getvalue()
