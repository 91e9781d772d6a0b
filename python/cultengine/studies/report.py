"""Reports of the studies: markdown tables and a self-contained HTML page with inline-SVG plots."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}"
    return str(v)


def md_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v).replace("|", "\\|") for v in r) + " |" for r in rows]
    return "\n".join(lines)


def html_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _color(v: float, lo: float, hi: float) -> str:
    """Diverging blue (low) - white - red (high) around the midpoint of [lo, hi] (0 if lo < 0 < hi)."""
    if v is None or math.isnan(v):
        return "#dddddd"
    mid = 0.0 if lo < 0 < hi else (lo + hi) / 2
    span = max(hi - mid, mid - lo, 1e-12)
    t = max(-1.0, min(1.0, (v - mid) / span))
    a = int(255 * (1 - abs(t)))
    return f"rgb(255,{a},{a})" if t > 0 else f"rgb({a},{a},255)"


def svg_bars(labels: Sequence[str], values: Sequence[float], title: str = "", width: int = 640) -> str:
    """Horizontal bars around zero (negative to the left), one row per label."""
    row, left, pad = 18, 170, 40
    vals = [0.0 if v is None or math.isnan(v) else float(v) for v in values]
    lo, hi = min(vals + [0.0]), max(vals + [0.0])
    span = (hi - lo) or 1.0
    plot_w = width - left - pad
    x0 = left + (-lo) / span * plot_w
    h = 30 + row * len(labels) + 10
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" font-size="11" '
        f'font-family="sans-serif"><text x="4" y="14" font-weight="bold">{html.escape(title)}</text>'
    ]
    for i, (lab, v) in enumerate(zip(labels, vals, strict=True)):
        y = 24 + i * row
        x, w = (x0, v / span * plot_w) if v >= 0 else (x0 + v / span * plot_w, -v / span * plot_w)
        color = "#c0392b" if v < 0 else "#2e86c1"
        out.append(
            f'<text x="{left - 4}" y="{y + 12}" text-anchor="end">{html.escape(str(lab))}</text>'
            f'<rect x="{x:.1f}" y="{y + 2}" width="{max(w, 0.5):.1f}" height="{row - 4}" fill="{color}"/>'
            f'<text x="{x0 + (w + 3 if v >= 0 else -w - 3):.1f}" y="{y + 12}" '
            f'text-anchor="{"start" if v >= 0 else "end"}">{v:.3f}</text>'
        )
    out.append(f'<line x1="{x0:.1f}" y1="22" x2="{x0:.1f}" y2="{h - 6}" stroke="#333"/></svg>')
    return "".join(out)


def svg_heatmap(
    row_labels: Sequence[str], col_labels: Sequence[str], values, title: str = "", cell: int = 14
) -> str:
    """A matrix as coloured cells (diverging colours; grey = missing), values in each cell's tooltip."""
    flat = [float(v) for r in values for v in r if v is not None and not math.isnan(float(v))]
    lo, hi = (min(flat), max(flat)) if flat else (0.0, 1.0)
    left, top = 150, 130
    w, h = left + cell * len(col_labels) + 10, top + cell * len(row_labels) + 10
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-size="10" '
        f'font-family="sans-serif"><text x="4" y="14" font-weight="bold">{html.escape(title)} '
        f"(range {lo:.3f} .. {hi:.3f})</text>"
    ]
    for j, c in enumerate(col_labels):
        x = left + j * cell + cell / 2
        out.append(
            f'<text transform="translate({x + 3:.1f},{top - 4}) rotate(-60)">{html.escape(str(c))}</text>'
        )
    for i, r in enumerate(row_labels):
        y = top + i * cell
        out.append(f'<text x="{left - 4}" y="{y + cell - 3}" text-anchor="end">{html.escape(str(r))}</text>')
        for j, v in enumerate(values[i]):
            v = float("nan") if v is None else float(v)
            out.append(
                f'<rect x="{left + j * cell}" y="{y}" width="{cell}" height="{cell}" '
                f'fill="{_color(v, lo, hi)}"><title>{html.escape(str(r))} / '
                f"{html.escape(str(col_labels[j]))}: {fmt(v)}</title></rect>"
            )
    out.append("</svg>")
    return "".join(out)


def write_report(out_dir: str | Path, name: str, title: str, sections: list[tuple[str, str, str]]) -> None:
    """Write `name`.md and `name`.html; each section is (heading, markdown body, html body)."""
    out_dir = Path(out_dir)
    md = [f"# {title}", ""] + [f"## {h}\n\n{m}\n" for h, m, _ in sections]
    (out_dir / f"{name}.md").write_text("\n".join(md), encoding="utf-8")
    body = "".join(f"<h2>{html.escape(h)}</h2>\n{x}\n" for h, _, x in sections)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>\n{body}</body></html>\n"
    )
    (out_dir / f"{name}.html").write_text(page, encoding="utf-8")
