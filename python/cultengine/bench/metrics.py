"""Per-sample results -> summary figures: overall, by group, Western vs non-Western gap.

Every figure carries its sample count `n` and a 95 % interval `<metric>_ci` (`ci_method` names it):
Wilson's score interval when the questions are independent; when questions share an image, Wilson at
the effective sample size, the design effect measured by a cluster bootstrap over images
(`stats.proportion`). `chance` is the accuracy of uniform guessing, averaged over the questions
(1/options; (1/options)^options for circular evaluation). The Western gap has a stratified
cluster-bootstrap interval and a cluster-permutation p-value (`stats.group_gap`). Standard errors are also
kept, sqrt(p(1-p)/(n-1)), as lm-evaluation-harness reports them. Only results (never
timings) go into `metrics`, and every resample is seeded, so an interrupted-and-resumed or sharded run has
the same figures as a straight one.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from .. import stats
from .rows import GROUP_KEYS

# result field -> metric name, per suite
METRICS = {
    "mcq": {"correct": "acc", "correct_norm": "acc_norm", "correct_vanilla": "acc_vanilla"},
    "vqa": {
        "correct": "exact_match",
        "normalized": "normalized_match",
        "contains": "contains",
        "judge_correct": "judge_acc",
    },
}
PRIMARY = {"mcq": "acc", "vqa": "exact_match"}


def chance(num_options: int, circular: bool) -> float | None:
    """Accuracy of uniform guessing on one question (every rotation right, under circular evaluation)."""
    if num_options < 1:
        return None
    return (1 / num_options) ** (num_options if circular else 1)


def mean_stderr(values: list[bool]) -> tuple[float | None, float | None]:
    n = len(values)
    if not n:
        return None, None
    p = sum(values) / n
    return p, (math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0)


def cluster_of(record: dict) -> str:
    """The unit of independence of a result: its image (questions on one image are correlated), else itself."""
    return record.get("cluster") or record["id"]


def figures(records: list[dict], suite: str) -> dict[str, Any]:
    """{n, <metric>, <metric>_stderr, <metric>_ci ..., ci_method, clusters, chance} over the labeled,
    error-free records."""
    scored = [r for r in records if r.get("correct") is not None]
    out: dict[str, Any] = {"n": len(scored)}
    for field, name in METRICS[suite].items():
        kept = [r for r in scored if r.get(field) is not None]
        if kept:
            vals = [bool(r[field]) for r in kept]
            p, se = mean_stderr(vals)
            est = stats.proportion(vals, [cluster_of(r) for r in kept])
            out[name], out[f"{name}_stderr"] = round(p, 6), round(se, 6)
            out[f"{name}_ci"] = [round(est.low, 6), round(est.high, 6)]
            out["ci_method"], out["clusters"] = est.method, est.clusters or est.n
            if est.effective_n is not None:
                out[f"{name}_effective_n"] = round(est.effective_n, 1)
    chances = [r["chance"] for r in scored if r.get("chance") is not None]
    if chances and len(chances) == len(scored):
        out["chance"] = round(sum(chances) / len(chances), 6)
    return out


def grouped(records: list[dict], key: str, suite: str) -> dict[str, dict]:
    buckets: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        buckets[r.get("groups", {}).get(key) or "unknown"].append(r)
    return {k: figures(v, suite) for k, v in sorted(buckets.items())}


def cross(records: list[dict], row_key: str, col_key: str, suite: str) -> dict[str, dict]:
    """row value -> column value -> figures (the category x region heatmap)."""
    rows: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        rows[r.get("groups", {}).get(row_key) or "unknown"].append(r)
    return {k: grouped(v, col_key, suite) for k, v in sorted(rows.items())}


def western_gap(records: list[dict], suite: str) -> dict[str, Any] | None:
    west = [r for r in records if r.get("western") is True]
    rest = [r for r in records if r.get("western") is False]
    if not west or not rest:
        return None
    w, nw = figures(west, suite), figures(rest, suite)
    m = PRIMARY[suite]
    if w.get(m) is None or nw.get(m) is None:
        return {"metric": m, "western": w, "non_western": nw, "gap": None}
    both = [r for r in west + rest if r.get("correct") is not None]
    est = stats.group_gap(
        [bool(r["correct"]) for r in both], [r["western"] for r in both], [cluster_of(r) for r in both]
    )
    return {
        "metric": m,
        "western": w,
        "non_western": nw,
        "gap": round(est.value, 6),
        "gap_ci": [round(est.low, 6), round(est.high, 6)],
        "gap_p": round(est.p, 6),
        "gap_method": est.method,
    }


def summarize(records: list[dict], skipped: list[dict], suite: str) -> dict[str, Any]:
    """The deterministic part of summary.json (`samples`, `overall`, `by`, `western_gap`)."""
    errors = [r for r in records if r.get("error")]
    ok = [r for r in records if not r.get("error")]
    unlabeled = [r for r in ok if r.get("correct") is None]
    out: dict[str, Any] = {
        "samples": {
            "evaluated": len(ok),
            "labeled": len(ok) - len(unlabeled),
            "unlabeled": len(unlabeled),
            "skipped": len(skipped) + len(errors),
            "skipped_rows": len(skipped),
            "engine_errors": len(errors),
        },
        "primary_metric": PRIMARY[suite],
        "overall": figures(ok, suite),
        "by": {k: grouped(ok, k, suite) for k in GROUP_KEYS},
        "by_category_region": cross(ok, "category", "region", suite),
        "western_gap": western_gap(ok, suite),
    }
    if unlabeled and len(unlabeled) == len(ok):
        out["note"] = (
            "the data carries no labels: predictions are written for submission "
            "(predictions.json) and no accuracy is claimed"
        )
    return out
