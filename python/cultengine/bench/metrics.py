"""Per-sample results -> summary figures: overall, by group, Western vs non-Western gap.

Every figure carries its sample count `n`. Accuracy standard errors are the sample standard error of
the mean, sqrt(p(1-p)/(n-1)), as lm-evaluation-harness reports them. Only results (never timings) go
into `metrics`, so an interrupted-and-resumed or sharded run has the same figures as a straight one.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from .data import GROUP_KEYS

# result field -> metric name, per suite
METRICS = {
    "mcq": {"correct": "acc", "correct_norm": "acc_norm", "correct_vanilla": "acc_vanilla"},
    "vqa": {"correct": "exact_match", "normalized": "normalized_match", "contains": "contains",
            "judge_correct": "judge_acc"},
}
PRIMARY = {"mcq": "acc", "vqa": "exact_match"}


def mean_stderr(values: list[bool]) -> tuple[float | None, float | None]:
    n = len(values)
    if not n:
        return None, None
    p = sum(values) / n
    return p, (math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0)


def figures(records: list[dict], suite: str) -> dict[str, Any]:
    """{n, <metric>, <metric>_stderr ...} over the labeled, error-free records."""
    scored = [r for r in records if r.get("correct") is not None]
    out: dict[str, Any] = {"n": len(scored)}
    for field, name in METRICS[suite].items():
        vals = [bool(r[field]) for r in scored if r.get(field) is not None]
        if vals:
            p, se = mean_stderr(vals)
            out[name], out[f"{name}_stderr"] = round(p, 6), round(se, 6)
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
    gap = None if w.get(m) is None or nw.get(m) is None else round(w[m] - nw[m], 6)
    return {"metric": m, "western": w, "non_western": nw, "gap": gap}


def summarize(records: list[dict], skipped: list[dict], suite: str) -> dict[str, Any]:
    """The deterministic part of summary.json (`samples`, `overall`, `by`, `western_gap`)."""
    errors = [r for r in records if r.get("error")]
    ok = [r for r in records if not r.get("error")]
    unlabeled = [r for r in ok if r.get("correct") is None]
    out: dict[str, Any] = {
        "samples": {"evaluated": len(ok), "labeled": len(ok) - len(unlabeled), "unlabeled": len(unlabeled),
                    "skipped": len(skipped) + len(errors), "skipped_rows": len(skipped),
                    "engine_errors": len(errors)},
        "primary_metric": PRIMARY[suite],
        "overall": figures(ok, suite),
        "by": {k: grouped(ok, k, suite) for k in GROUP_KEYS},
        "by_category_region": cross(ok, "category", "region", suite),
        "western_gap": western_gap(ok, suite),
    }
    if unlabeled and len(unlabeled) == len(ok):
        out["note"] = ("the data carries no labels: predictions are written for submission "
                       "(predictions.json) and no accuracy is claimed")
    return out
