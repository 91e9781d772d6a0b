"""summary.json -> report.md and report.html (plots drawn as inline SVG, no plotting dependency)."""

from __future__ import annotations

import html
from typing import Any

CHANCE_NOTE = ("This run used the demo checkpoint (random weights): its accuracy is chance level. "
               "It demonstrates the pipeline and the engine's throughput, not a model's knowledge.")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _rows(groups: dict[str, dict], metric: str) -> list[tuple[str, float, int]]:
    return [(k, v[metric], v["n"]) for k, v in groups.items() if v.get(metric) is not None]


def worst(groups: dict[str, dict], metric: str, k: int = 10, min_n: int = 1) -> list[tuple[str, float, int]]:
    return sorted((r for r in _rows(groups, metric) if r[2] >= min_n), key=lambda r: (r[1], r[0]))[:k]


# ------------------------------------------------------------------------------------------ SVG


def _esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def bar_chart(items: list[tuple[str, float, int]], title: str) -> str:
    """Horizontal bars, one per (label, value in [0, 1], n)."""
    if not items:
        return ""
    lw, bw, bh, top = 190, 360, 18, 28
    h = top + len(items) * (bh + 6) + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{lw + bw + 110}" height="{h}" '
           f'font-family="sans-serif" font-size="12" role="img" aria-label="{_esc(title)}">',
           f'<text x="4" y="16" font-weight="bold">{_esc(title)}</text>']
    for i, (label, v, n) in enumerate(items):
        y = top + i * (bh + 6)
        out.append(f'<text x="{lw - 6}" y="{y + 13}" text-anchor="end">{_esc(label)}</text>')
        out.append(f'<rect x="{lw}" y="{y}" width="{bw}" height="{bh}" fill="#eee"/>')
        out.append(f'<rect x="{lw}" y="{y}" width="{bw * v:.1f}" height="{bh}" fill="#3b7dd8"/>')
        out.append(f'<text x="{lw + bw + 6}" y="{y + 13}">{100 * v:.1f}% (n={n})</text>')
    out.append("</svg>")
    return "\n".join(out)


def _color(v: float) -> str:
    # white (0) -> blue (1)
    r, g = int(255 - 196 * v), int(255 - 130 * v)
    return f"rgb({r},{g},216)" if v > 0 else "rgb(255,255,255)"


def heatmap(table: dict[str, dict[str, dict]], metric: str, title: str) -> str:
    rows = sorted(table)
    cols = sorted({c for r in table.values() for c in r})
    if not rows or not cols:
        return ""
    lw, cw, ch, top = 150, 62, 26, 120
    w, h = lw + cw * len(cols) + 10, top + ch * len(rows) + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           f'font-size="11" role="img" aria-label="{_esc(title)}">',
           f'<text x="4" y="16" font-weight="bold" font-size="12">{_esc(title)}</text>']
    for j, c in enumerate(cols):
        x = lw + j * cw + cw / 2
        out.append(f'<text transform="translate({x:.0f},{top - 6}) rotate(-50)">{_esc(c)}</text>')
    for i, r in enumerate(rows):
        y = top + i * ch
        out.append(f'<text x="{lw - 6}" y="{y + 17}" text-anchor="end">{_esc(r)}</text>')
        for j, c in enumerate(cols):
            cell = table[r].get(c, {})
            v = cell.get(metric)
            x = lw + j * cw
            fill = "#f7f7f7" if v is None else _color(v)
            out.append(f'<rect x="{x}" y="{y}" width="{cw - 2}" height="{ch - 2}" fill="{fill}">'
                       f'<title>{_esc(r)} / {_esc(c)}: {_pct(v)}% (n={cell.get("n", 0)})</title></rect>')
            if v is not None:
                tc = "#fff" if v > 0.6 else "#000"
                out.append(f'<text x="{x + cw / 2 - 1:.0f}" y="{y + 17}" text-anchor="middle" '
                           f'fill="{tc}">{_pct(v)}</text>')
    out.append("</svg>")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ text


def _table_md(groups: dict[str, dict], metrics: list[str]) -> str:
    head = "| group | n | " + " | ".join(metrics) + " |\n|---|---|" + "---|" * len(metrics) + "\n"
    body = "".join(
        f"| {k} | {v['n']} | " + " | ".join(_pct(v.get(m)) for m in metrics) + " |\n"
        for k, v in groups.items()
    )
    return head + body


def _metric_names(summary: dict) -> list[str]:
    o = summary["overall"]
    return [k for k in ("acc", "acc_norm", "acc_vanilla", "exact_match", "contains") if k in o]


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
    run = summary.get("run", {})
    if run:
        lines += ["## Run", ""] + [f"- {k}: {v}" for k, v in run.items() if not isinstance(v, dict)]
        lines += [f"- engine {k}: {v}" for k, v in run.get("engine", {}).items()] + [""]
    return "\n".join(lines)


def html_report(summary: dict) -> str:
    m = summary["primary_metric"]
    plots = [
        bar_chart(sorted(_rows(summary["by"]["region"], m), key=lambda r: -r[1]), f"{m} by region"),
        heatmap(summary.get("by_category_region", {}), m, f"{m}: category x region"),
        bar_chart(worst(summary["by"]["country"], m), f"worst countries by {m}"),
    ]
    body = "\n".join(f"<figure>{p}</figure>" for p in plots if p)
    md = _esc(markdown(summary))
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'><title>cultengine bench report</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "pre{white-space:pre-wrap;background:#f8f8f8;padding:1em}figure{margin:1.5em 0}</style></head>"
        f"<body><h1>cultengine bench report</h1>\n{body}\n<pre>{md}</pre></body></html>\n"
    )
