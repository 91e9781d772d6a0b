"""summary.json -> report.md and report.html (plots drawn as inline SVG, no plotting dependency).

The page reads top to bottom: a summary (what ran, on what, how long, the headline numbers with their
intervals), the plots, the tables, the methods (which interval or test each number uses), the run section.
"""

from __future__ import annotations

from .. import plots, provenance
from . import judge, langgap

CHANCE_NOTE = (
    "This run used the demo checkpoint (random weights): its accuracy is chance level. "
    "It demonstrates the pipeline and the engine's throughput, not a model's knowledge."
)
GROUP_ORDER = ("continent", "region", "country", "category", "question_type", "language")
MIN_CELL_N = 10  # groups and cells with fewer samples are greyed in plots and marked in tables

METHODS = [
    "Accuracy intervals: 95 % Wilson score interval when every question has its own image. When questions "
    "share an image they are not independent: a cluster bootstrap (2,000 resamples of whole images) measures "
    "the variance, its ratio to the binomial variance is the design effect, and the interval is Wilson's at "
    "the effective sample size n / design effect (`<metric>_effective_n`); where every question of a group is "
    "right (or wrong), Wilson over the number of images. `ci_method` in summary.json names the method.",
    "Western vs non-Western gap: difference of accuracies; 95 % interval from a stratified cluster bootstrap "
    "(images resampled within each group, 2,000 resamples); two-sided p-value from a permutation test "
    "(9,999 random reassignments of the group labels over images).",
    "Chance: the accuracy of uniform guessing averaged over the questions (1 / options; for circular "
    "evaluation (1 / options) ^ options).",
    "All resampling is seeded: the same results give the same intervals and p-values.",
]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _ci(fig: dict, metric: str) -> str:
    ci = fig.get(f"{metric}_ci")
    return "-" if not ci else f"[{_pct(ci[0])}, {_pct(ci[1])}]"


def min_cell_n(summary: dict) -> int:
    return int(summary.get("config", {}).get("min_cell_n") or MIN_CELL_N)


def _rows(groups: dict[str, dict], metric: str) -> list[tuple[str, dict]]:
    return [(k, v) for k, v in groups.items() if v.get(metric) is not None]


def worst(groups: dict[str, dict], metric: str, k: int = 10, min_n: int = 1) -> list[tuple[str, float, int]]:
    """The k lowest groups by `metric`; ties broken by n (more samples first: surer), then name."""
    rows = [(name, v[metric], v["n"]) for name, v in _rows(groups, metric) if v["n"] >= min_n]
    return sorted(rows, key=lambda r: (r[1], -r[2], r[0]))[:k]


def _table_md(groups: dict[str, dict], metrics: list[str], min_n: int) -> str:
    chance = any("chance" in v for v in groups.values())
    headers = ["group", "n", *(h for m in metrics for h in (m, f"{m} 95% CI"))] + (["chance"] if chance else [])
    rows = []
    for k, v in groups.items():
        name = f"{k} (n < {min_n})" if v["n"] < min_n else k
        row = [name, v["n"], *(x for m in metrics for x in (_pct(v.get(m)), _ci(v, m)))]
        rows.append(row + ([_pct(v.get("chance"))] if chance else []))
    return plots.md_table(headers, rows) + "\n"


def _bars(items: list[tuple[str, dict]], metric: str, title: str, chance: float | None, min_n: int) -> str:
    return plots.bar_chart(
        [k for k, _ in items],
        [v[metric] for _, v in items],
        title,
        counts=[v["n"] for _, v in items],
        percent=True,
        intervals=[v.get(f"{metric}_ci") or (None, None) for _, v in items],
        reference=chance,
        reference_label="chance",
        min_n=min_n,
    )


def _heatmap(table: dict[str, dict[str, dict]], metric: str, title: str, min_n: int) -> str:
    rows, cols = sorted(table), sorted({c for r in table.values() for c in r})
    cells = [[table[r].get(c, {}) for c in cols] for r in rows]
    return plots.heatmap(
        rows,
        cols,
        [[x.get(metric) for x in row] for row in cells],
        title,
        counts=[[x.get("n", 0) for x in row] for row in cells],
        percent=True,
        min_n=min_n,
    )


def _metric_names(summary: dict) -> list[str]:
    o = summary["overall"]
    return [
        k
        for k in ("acc", "acc_norm", "acc_vanilla", "exact_match", "normalized_match", "contains", "judge_acc")
        if k in o
    ]


def _headline(fig: dict, metric: str) -> str:
    method = fig.get("ci_method", "")
    over = f", {fig['clusters']} images" if method.startswith("cluster") or "clusters" in method else ""
    chance = f"; chance {_pct(fig['chance'])} %" if fig.get("chance") is not None else ""
    return f"{metric} {_pct(fig.get(metric))} % {_ci(fig, metric)} (95 % CI, {method}{over}), n = {fig['n']}{chance}"


def gap_line(gap: dict) -> str:
    if gap.get("gap") is None:
        return "Western vs non-Western: no accuracy on one side"
    ci = gap.get("gap_ci")
    ci_text = f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else ""
    p = f", p = {plots.fmt(gap['gap_p'])}" if gap.get("gap_p") is not None else ""
    return (
        f"Western minus non-Western ({gap['metric']}): {100 * gap['gap']:+.1f} points{ci_text}{p} "
        f"(n = {gap['western']['n']} vs {gap['non_western']['n']})"
    )


def _header(summary: dict) -> list[str]:
    cfg = summary.get("config", {})
    lines = [f"# cultengine bench: {cfg.get('model_name', '')}", ""]
    if summary.get("demo"):
        lines += [f"> {CHANCE_NOTE}", ""]
    if summary.get("note"):
        lines += [f"> {summary['note']}", ""]
    return lines


def _summary(summary: dict) -> list[str]:
    m = summary["primary_metric"]
    s, cfg, run = summary["samples"], summary.get("config", {}), summary.get("run", {})
    sha = run.get("checkpoint", {}).get("sha256")
    lines = [
        "## Summary",
        "",
        f"- model: {cfg.get('model_name', '')}" + (f" (sha256 {sha[:16]})" if sha else ""),
        f"- data: {', '.join(cfg.get('data', []))}",
        f"- suite: {cfg.get('suite')}, scoring: {cfg.get('scoring')}, circular: {cfg.get('circular')}",
        f"- samples evaluated: {s['evaluated']} (labeled {s['labeled']}), skipped: {s['skipped']} "
        f"({s['skipped_rows']} bad rows, {s['engine_errors']} engine errors)",
    ]
    secs = run.get("engine", {}).get("run_seconds")
    if secs is not None:
        lines.append(f"- engine time: {secs:.1f} s")
    if summary["overall"].get(m) is not None:
        lines.append(f"- {_headline(summary['overall'], m)}")
    if summary.get("western_gap"):
        lines.append(f"- {gap_line(summary['western_gap'])}")
    return lines + [""]


def _tables(summary: dict, min_n: int) -> list[str]:
    names = _metric_names(summary)
    lines = ["## Overall", "", _table_md({"all": summary["overall"]}, names, min_n)]
    gap = summary.get("western_gap")
    if gap:
        lines += [
            "## Western vs non-Western",
            "",
            _table_md({"Western": gap["western"], "non-Western": gap["non_western"]}, names, min_n),
            gap_line(gap) + ".",
            "",
        ]
    for key in GROUP_ORDER:
        groups = summary["by"].get(key, {})
        if len(groups) > 1 or (groups and "unknown" not in groups):
            lines += [f"## By {key.replace('_', ' ')}", "", _table_md(groups, names, min_n)]
    lines += judge.markdown(summary) + langgap.markdown(summary)
    return lines


def _methods(min_n: int) -> list[str]:
    return (
        ["## Methods", ""]
        + [f"- {m}" for m in METHODS]
        + [f"- Groups and heatmap cells with n < {min_n} are greyed in the plots and marked in the tables.", ""]
    )


def _run(summary: dict) -> list[str]:
    run = summary.get("run", {})
    return provenance.markdown(run) if run else []


def markdown(summary: dict) -> str:
    min_n = min_cell_n(summary)
    return "\n".join(_header(summary) + _summary(summary) + _tables(summary, min_n) + _methods(min_n) + _run(summary))


def figures(summary: dict) -> list[str]:
    """The report's plots as SVG strings: groups with intervals and chance, the heatmap, worst countries."""
    m, min_n = summary["primary_metric"], min_cell_n(summary)
    chance = summary["overall"].get("chance")
    out = []
    for key in ("continent", "region", "category", "question_type"):
        rows = _rows(summary["by"].get(key, {}), m)
        if len(rows) > 1:
            rows.sort(key=lambda r: (-r[1][m], -r[1]["n"], r[0]))
            out.append(_bars(rows, m, f"{m} by {key.replace('_', ' ')} (95 % CI)", chance, min_n))
    title = f"{m} (%): category x region, n per cell, grey: n < {min_n}"
    out.append(_heatmap(summary.get("by_category_region", {}), m, title, min_n))
    countries = summary["by"].get("country", {})
    bad = [(k, countries[k]) for k, _, _ in worst(countries, m, k=15)]
    if bad:
        out.append(_bars(bad, m, f"worst countries by {m} (ties: more samples first)", chance, min_n))
    out.append(langgap.plot(summary))
    return [f for f in out if f]


def html_report(summary: dict) -> str:
    min_n = min_cell_n(summary)
    figs = "\n".join(f"<figure>{p}</figure>" for p in figures(summary))
    head = plots.markdown_html("\n".join(_header(summary) + _summary(summary)))
    tail = plots.markdown_html("\n".join(_tables(summary, min_n) + _methods(min_n) + _run(summary)))
    title = plots.esc(f"cultengine bench: {summary.get('config', {}).get('model_name', '')}")
    return (
        f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<style>{plots.PAGE_STYLE}</style></head><body>\n{head}\n<h2>Plots</h2>\n{figs}\n{tail}\n</body></html>\n"
    )
