"""summary.json -> report.md and report.html (plots drawn as inline SVG, no plotting dependency)."""

from __future__ import annotations

from .. import plots
from . import judge, langgap

CHANCE_NOTE = ("This run used the demo checkpoint (random weights): its accuracy is chance level. "
               "It demonstrates the pipeline and the engine's throughput, not a model's knowledge.")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _rows(groups: dict[str, dict], metric: str) -> list[tuple[str, float, int]]:
    return [(k, v[metric], v["n"]) for k, v in groups.items() if v.get(metric) is not None]


def worst(groups: dict[str, dict], metric: str, k: int = 10, min_n: int = 1) -> list[tuple[str, float, int]]:
    return sorted((r for r in _rows(groups, metric) if r[2] >= min_n), key=lambda r: (r[1], r[0]))[:k]


def _table_md(groups: dict[str, dict], metrics: list[str]) -> str:
    rows = [[k, v["n"], *(_pct(v.get(m)) for m in metrics)] for k, v in groups.items()]
    return plots.md_table(["group", "n", *metrics], rows) + "\n"


def _bars(items: list[tuple[str, float, int]], title: str) -> str:
    return plots.bar_chart([k for k, _, _ in items], [v for _, v, _ in items], title,
                           counts=[n for _, _, n in items], percent=True)


def _heatmap(table: dict[str, dict[str, dict]], metric: str, title: str) -> str:
    rows, cols = sorted(table), sorted({c for r in table.values() for c in r})
    cells = [[table[r].get(c, {}) for c in cols] for r in rows]
    return plots.heatmap(rows, cols, [[x.get(metric) for x in row] for row in cells], title,
                         counts=[[x.get("n", 0) for x in row] for row in cells], percent=True)


def _metric_names(summary: dict) -> list[str]:
    o = summary["overall"]
    return [k for k in ("acc", "acc_norm", "acc_vanilla", "exact_match", "normalized_match", "contains", "judge_acc")
            if k in o]


def markdown(summary: dict) -> str:
    m = summary["primary_metric"]
    names = _metric_names(summary)
    s, cfg = summary["samples"], summary.get("config", {})
    lines = [f"# cultengine bench: {cfg.get('model_name', '')}", ""]
    if summary.get("demo"):
        lines += [f"> **{CHANCE_NOTE}**", ""]
    if summary.get("note"):
        lines += [f"> {summary['note']}", ""]
    lines += [
        f"- suite: {cfg.get('suite')}, scoring: {cfg.get('scoring')}, circular: {cfg.get('circular')}",
        f"- data: {', '.join(cfg.get('data', []))}",
        f"- samples evaluated: {s['evaluated']} (labeled {s['labeled']}), skipped: {s['skipped']} "
        f"({s['skipped_rows']} bad rows, {s['engine_errors']} engine errors)",
        "", "## Overall", "", _table_md({"all": summary["overall"]}, names),
    ]
    gap = summary.get("western_gap")
    if gap:
        lines += ["## Western vs non-Western", "",
                  _table_md({"Western": gap["western"], "non-Western": gap["non_western"]}, names),
                  f"Gap ({m}, Western minus non-Western): {_pct(gap['gap'])} points.", ""]
    for key in ("continent", "region", "country", "category", "question_type", "language"):
        groups = summary["by"].get(key, {})
        if len(groups) > 1 or (groups and "unknown" not in groups):
            lines += [f"## By {key.replace('_', ' ')}", "", _table_md(groups, names)]
    lines += judge.markdown(summary) + langgap.markdown(summary)
    run = summary.get("run", {})
    if run:
        lines += ["## Run", ""] + [f"- {k}: {v}" for k, v in run.items() if not isinstance(v, dict)]
        lines += [f"- engine {k}: {v}" for k, v in run.get("engine", {}).items()] + [""]
    return "\n".join(lines)


def html_report(summary: dict) -> str:
    m = summary["primary_metric"]
    figures = [
        _bars(sorted(_rows(summary["by"]["region"], m), key=lambda r: -r[1]), f"{m} by region"),
        _heatmap(summary.get("by_category_region", {}), m, f"{m}: category x region"),
        _bars(worst(summary["by"]["country"], m), f"worst countries by {m}"),
        langgap.plot(summary),
    ]
    text = markdown(summary)
    title, _, rest = text.partition("\n")  # the report's own heading and notes go above the plots
    notes, _, tables = rest.partition("\n## ")
    figs = "\n".join(f"<figure>{p}</figure>" for p in figures if p)
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'><title>cultengine bench report</title>"
        f"<style>{plots.PAGE_STYLE}</style></head><body>\n{plots.markdown_html(title + chr(10) + notes)}\n"
        f"{figs}\n{plots.markdown_html('## ' + tables)}\n</body></html>\n"
    )
