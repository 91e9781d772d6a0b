"""Tables and inline-SVG plots for the bench and studies reports (no plotting dependency).

Plots take `percent=True` for fractions in [0, 1], drawn on a fixed 0..100% scale; otherwise the scale
spans the data. Colours diverge from white at 0 (at the midpoint when the data lie on one side of 0):
blue above, red below. Labels are drawn in the order given; missing values are None or NaN.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

BLUE, RED = (59, 125, 216), (192, 57, 43)


def esc(s) -> str:
    return html.escape(str(s))


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


def markdown_html(md: str) -> str:
    """HTML for the markdown the reports write: headings, pipe tables, bullets, quotes, paragraphs."""
    out, table = [], []

    def flush_table() -> None:
        if table:
            cells = [[c.strip() for c in row.strip().strip("|").split(" | ")] for row in table if "---|" not in row]
            out.append(html_table(cells[0], cells[1:]))
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{esc(line[level:].strip())}</h{level}>")
        elif line.startswith("> "):
            out.append(f"<p class='note'>{esc(line[2:].strip('* '))}</p>")
        elif line.startswith("- "):
            out.append(f"<li>{esc(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{esc(line)}</p>")
    flush_table()
    return "\n".join(out)


PAGE_STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
              "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
              "font-size:13px;text-align:left}figure{margin:1.5em 0;overflow-x:auto}"
              ".note{background:#fff3cd;border:1px solid #e0c36c;padding:.6em 1em;font-weight:bold}")


def html_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _num(v) -> float:
    return math.nan if v is None else float(v)


def _text(v: float, percent: bool) -> str:
    if percent:
        return "-" if math.isnan(v) else f"{100 * v:.1f}%"
    return fmt(v)


def _range(values: list[float], percent: bool) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    return (0.0, 1.0) if percent or not finite else (min(finite), max(finite))


def _color(v: float, lo: float, hi: float) -> str:
    if math.isnan(v):
        return "#eee"
    mid = 0.0 if lo <= 0 <= hi else (lo + hi) / 2
    t = max(-1.0, min(1.0, (v - mid) / max(hi - mid, mid - lo, 1e-12)))
    r, g, b = (round(255 - (255 - c) * abs(t)) for c in (BLUE if t > 0 else RED))
    return f"rgb({r},{g},{b})"


def _svg(width: float, height: float, title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'font-family="sans-serif" font-size="11" role="img" aria-label="{esc(title)}">'
            f'<text x="4" y="16" font-weight="bold" font-size="12">{esc(title)}</text>')


def bar_chart(labels: Sequence[str], values: Sequence, title: str, counts: Sequence[int] | None = None,
              percent: bool = False) -> str:
    """Horizontal bars from 0 (negative ones to the left), one row per label; value and n at the right."""
    if not labels:
        return ""
    vals = [_num(v) for v in values]
    lo, hi = _range(vals + [0.0], percent)
    left, plot_w, row = 190, 360, 22
    scale = plot_w / ((hi - lo) or 1.0)
    x0 = left - lo * scale
    h = 30 + row * len(vals) + 10
    out = [_svg(left + plot_w + 120, h, title)]
    for i, (label, v) in enumerate(zip(labels, vals, strict=True)):
        y = 28 + i * row
        w = 0.0 if math.isnan(v) else v * scale
        n = f" (n={counts[i]})" if counts is not None else ""
        out.append(f'<text x="{left - 6}" y="{y + 13}" text-anchor="end">{esc(label)}</text>'
                   f'<rect x="{left}" y="{y}" width="{plot_w}" height="{row - 4}" fill="#f3f3f3"/>'
                   f'<rect x="{min(x0, x0 + w):.1f}" y="{y}" width="{abs(w):.1f}" height="{row - 4}" '
                   f'fill="rgb{BLUE if v >= 0 else RED}"/>'
                   f'<text x="{left + plot_w + 6}" y="{y + 13}">{_text(v, percent)}{n}</text>')
    out.append(f'<line x1="{x0:.1f}" y1="24" x2="{x0:.1f}" y2="{h - 6}" stroke="#333"/></svg>')
    return "".join(out)


def heatmap(row_labels: Sequence[str], col_labels: Sequence[str], values, title: str,
            counts=None, percent: bool = False) -> str:
    """A rows x cols matrix as coloured cells, each value (and n) in its tooltip; `percent` cells are
    wide enough to also show the value."""
    if not row_labels or not col_labels:
        return ""
    grid = [[_num(v) for v in r] for r in values]
    lo, hi = _range([v for r in grid for v in r], percent)
    if not percent:
        title = f"{title} (range {lo:.3f} .. {hi:.3f})"
    cw, ch = (44, 24) if percent else (14, 14)
    left, top = 150, 130
    out = [_svg(left + cw * len(col_labels) + 10, top + ch * len(row_labels) + 10, title)]
    for j, c in enumerate(col_labels):
        out.append(f'<text transform="translate({left + j * cw + cw / 2 + 3:.0f},{top - 4}) rotate(-60)">'
                   f"{esc(c)}</text>")
    for i, r in enumerate(row_labels):
        y = top + i * ch
        out.append(f'<text x="{left - 4}" y="{y + ch / 2 + 4:.0f}" text-anchor="end">{esc(r)}</text>')
        for j, v in enumerate(grid[i]):
            x = left + j * cw
            n = f" (n={counts[i][j]})" if counts is not None else ""
            out.append(f'<rect x="{x}" y="{y}" width="{cw - 1}" height="{ch - 1}" fill="{_color(v, lo, hi)}">'
                       f"<title>{esc(r)} / {esc(col_labels[j])}: {_text(v, percent)}{n}</title></rect>")
            if percent and not math.isnan(v):
                out.append(f'<text x="{x + cw / 2:.0f}" y="{y + ch / 2 + 4:.0f}" text-anchor="middle" '
                           f'fill="{"#fff" if v > 0.6 else "#000"}">{100 * v:.1f}</text>')
    out.append("</svg>")
    return "".join(out)
