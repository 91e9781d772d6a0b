"""The English-vs-local-language gap: the same questions asked in English and in the local language
(`--cvqa-lang both`), the primary metric of each per country and per language, and the drop
(English minus local) a model shows when asked in the local language."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from .. import plots
from .metrics import figures

KEYS = ("country", "language")


def _pair(recs: list[dict], suite: str, metric: str) -> dict[str, Any]:
    en = figures([r for r in recs if r.get("prompt_lang") == "en"], suite)
    local = figures([r for r in recs if r.get("prompt_lang") == "local"], suite)
    e, lo = en.get(metric), local.get(metric)
    return {
        "en": e,
        "local": lo,
        "n_en": en["n"],
        "n_local": local["n"],
        "gap": None if e is None or lo is None else round(e - lo, 6),
    }


def language_gap(records: list[dict], suite: str, metric: str) -> dict[str, Any] | None:
    """{metric, overall, by: {country|language: {value: {en, local, n_en, n_local, gap}}}}, or None
    when the run did not ask both languages."""
    langs = {r.get("prompt_lang") for r in records}
    if not {"en", "local"} <= langs:
        return None
    by: dict[str, dict[str, Any]] = {}
    for key in KEYS:
        buckets: dict[str, list[dict]] = defaultdict(list)
        for r in records:
            buckets[r.get("groups", {}).get(key) or "unknown"].append(r)
        by[key] = {k: _pair(v, suite, metric) for k, v in sorted(buckets.items())}
    return {"metric": metric, "overall": _pair(records, suite, metric), "by": by}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def markdown(summary: dict) -> list[str]:
    g = summary.get("language_gap")
    if not g:
        return []
    lines = [
        "## English vs local language",
        "",
        f"{g['metric']} asked in English and in the local language; gap = English minus local "
        f"(points; positive: the model does worse in the local language). Overall: "
        f"{_pct(g['overall']['en'])} vs {_pct(g['overall']['local'])}, gap {_pct(g['overall']['gap'])}.",
        "",
    ]
    for key in KEYS:
        rows = [[k, v["n_en"], _pct(v["en"]), _pct(v["local"]), _pct(v["gap"])] for k, v in g["by"][key].items()]
        lines += [f"### By {key}", "", plots.md_table([key, "n", "English", "local", "gap"], rows), ""]
    return lines


def plot(summary: dict) -> str:
    g = summary.get("language_gap")
    if not g:
        return ""
    items = sorted(
        ((k, v) for k, v in g["by"]["country"].items() if v["gap"] is not None), key=lambda kv: -kv[1]["gap"]
    )
    return plots.bar_chart(
        [k for k, _ in items],
        [v["gap"] for _, v in items],
        f"{g['metric']}: English minus local language, by country",
        counts=[v["n_en"] for _, v in items],
        percent=True,
    )
