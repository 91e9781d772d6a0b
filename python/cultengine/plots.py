"""Tables and inline-SVG plots for the bench and studies reports (no plotting dependency).

Plots take `percent=True` for fractions in [0, 1], drawn on a fixed 0..100% scale; otherwise the scale
spans the data. Margins are sized from the labels (`text_width`), so no label is clipped at any length.
Colours diverge from white at 0 (at the midpoint when the data lie on one side of 0): blue above, red below.
Labels are drawn in the order given; missing values are None or NaN.
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


PAGE_STYLE = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
    "font-size:13px;text-align:left}figure{margin:1.5em 0;overflow-x:auto}"
    ".note{background:#fff3cd;border:1px solid #e0c36c;padding:.6em 1em;font-weight:bold}"
)


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


def text_width(s, size: float = 11) -> float:
    """A generous estimate of rendered text width (sans-serif), so margins hold every label unclipped."""
    return len(str(s)) * size * 0.62 + 4


def _svg(width: float, height: float, title: str) -> str:
    width = max(width, text_width(title, 12) + 8)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif" font-size="11" role="img" '
        f'aria-label="{esc(title)}"><text x="4" y="16" font-weight="bold" font-size="12">{esc(title)}</text>'
    )


SPARSE = "#bbb"  # bars and cells with too few samples to colour by value


def bar_chart(
    labels: Sequence[str],
    values: Sequence,
    title: str,
    counts: Sequence[int] | None = None,
    percent: bool = False,
    intervals: Sequence[Sequence] | None = None,
    reference: float | None = None,
    reference_label: str = "chance",
    min_n: int = 0,
) -> str:
    """Horizontal bars from 0 (negative ones to the left), one row per label; value, interval and n at the
    right. `intervals` draws each (low, high) as a whisker; `reference` a dashed vertical line (chance);
    bars with n < `min_n` are grey."""
    if not labels:
        return ""
    vals = [_num(v) for v in values]
    ivs = [(_num(a), _num(b)) for a, b in intervals] if intervals is not None else None
    extra = [x for iv in ivs or [] for x in iv] + ([reference] if reference is not None else [])
    lo, hi = _range(vals + extra + [0.0], percent)
    row, plot_w = 22, 360
    left = max(60.0, max(text_width(x) for x in labels) + 10)
    notes = [
        _bar_note(vals[i], ivs[i] if ivs else None, counts[i] if counts else None, percent) for i in range(len(vals))
    ]
    scale = plot_w / ((hi - lo) or 1.0)
    x0 = left - lo * scale
    top = 44 if reference is not None else 28
    h = top + row * len(vals) + 10
    out = [_svg(left + plot_w + 12 + max(text_width(t) for t in notes), h, title)]
    for i, (label, v) in enumerate(zip(labels, vals, strict=True)):
        y = top + i * row
        w = 0.0 if math.isnan(v) else v * scale
        sparse = counts is not None and counts[i] < min_n
        fill = SPARSE if sparse else f"rgb{BLUE if v >= 0 else RED}"
        out.append(
            f'<text x="{left - 6:.1f}" y="{y + 13}" text-anchor="end">{esc(label)}</text>'
            f'<rect x="{left:.1f}" y="{y}" width="{plot_w}" height="{row - 4}" fill="#f3f3f3"/>'
            f'<rect x="{min(x0, x0 + w):.1f}" y="{y}" width="{abs(w):.1f}" height="{row - 4}" fill="{fill}"/>'
        )
        if ivs and not math.isnan(ivs[i][0]):
            a, b = (left + (x - lo) * scale for x in ivs[i])
            ym = y + (row - 4) / 2
            out.append(
                f'<path d="M{a:.1f} {ym - 4:.1f}v8M{a:.1f} {ym:.1f}H{b:.1f}M{b:.1f} {ym - 4:.1f}v8" '
                f'stroke="#222" stroke-width="1.2" fill="none"/>'
            )
        out.append(f'<text x="{left + plot_w + 6:.1f}" y="{y + 13}">{esc(notes[i])}</text>')
    out.append(f'<line x1="{x0:.1f}" y1="{top - 4}" x2="{x0:.1f}" y2="{h - 6}" stroke="#333"/>')
    if reference is not None:
        xr = left + (reference - lo) * scale
        label = f"{reference_label} {_text(reference, percent)}"
        anchor = "end" if xr + text_width(label) > left + plot_w else "start"
        out.append(
            f'<line x1="{xr:.1f}" y1="{top - 6}" x2="{xr:.1f}" y2="{h - 6}" stroke="#c0392b" '
            f'stroke-dasharray="4 3"/><text x="{xr:.1f}" y="{top - 10}" fill="#c0392b" '
            f'text-anchor="{anchor}">{esc(label)}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def _bar_note(v: float, interval, n, percent: bool) -> str:
    text = _text(v, percent)
    if interval is not None and not math.isnan(interval[0]):
        text += f" [{_text(interval[0], percent)}, {_text(interval[1], percent)}]"
    return text + (f" n={n}" if n is not None else "")


def _colour_scale(x: float, y: float, width: float, lo: float, hi: float, percent: bool, sparse: bool) -> str:
    """The heatmap's legend: the colours from `lo` to `hi` with their values at both ends (and 0 between, where
    the colours turn), the no-value grey, and the too-few-samples grey."""
    steps = 24
    w = width / steps
    out = [f'<text x="{x:.1f}" y="{y + 9:.1f}">colour scale</text>']
    y += 14
    for k in range(steps):
        v = lo + (hi - lo) * (k + 0.5) / steps
        out.append(
            f'<rect x="{x + k * w:.1f}" y="{y:.1f}" width="{w + 0.5:.1f}" height="10" fill="{_color(v, lo, hi)}"/>'
        )
    out.append(f'<text x="{x:.1f}" y="{y + 22:.1f}">{_text(lo, percent)}</text>')
    out.append(f'<text x="{x + width:.1f}" y="{y + 22:.1f}" text-anchor="end">{_text(hi, percent)}</text>')
    if lo < 0 < hi and 0.15 < -lo / (hi - lo) < 0.85:
        out.append(f'<text x="{x - lo / (hi - lo) * width:.1f}" y="{y + 22:.1f}" text-anchor="middle">0</text>')
    y += 30
    swatches = [(_color(math.nan, lo, hi), "no value")] + ([(SPARSE, "too few samples")] if sparse else [])
    for k, (fill, label) in enumerate(swatches):
        sx = x + k * 120
        out.append(
            f'<rect x="{sx:.1f}" y="{y:.1f}" width="10" height="10" fill="{fill}" stroke="#999"/>'
            f'<text x="{sx + 14:.1f}" y="{y + 9:.1f}">{label}</text>'
        )
    return "".join(out)


def heatmap(
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    values,
    title: str,
    counts=None,
    percent: bool = False,
    min_n: int = 0,
) -> str:
    """A rows x cols matrix as coloured cells, each value (and n) in its tooltip; `percent` cells are
    wide enough to also show the value and n. Cells with n < `min_n` are grey, not coloured by value."""
    if not row_labels or not col_labels:
        return ""
    grid = [[_num(v) for v in r] for r in values]
    lo, hi = _range([v for r in grid for v in r], percent)
    if not percent:
        title = f"{title} (range {lo:.3f} .. {hi:.3f})"
    # Cells at least as wide as a line of text, so the column labels, drawn upright (rotated a quarter turn),
    # never overlap; values are read from the colour scale below and each cell's tooltip.
    cw, ch = (48, 30) if percent else (18, 18)
    longest_col = max(text_width(c) for c in col_labels)
    left = max(60.0, max(text_width(r) for r in row_labels) + 8)
    top = 30 + longest_col
    bottom = top + ch * len(row_labels)
    scale_w = max(cw * len(col_labels), 220.0)
    width = left + max(cw * len(col_labels), scale_w) + 30
    out = [_svg(width, bottom + 74, title)]
    for j, c in enumerate(col_labels):
        out.append(
            f'<text transform="translate({left + j * cw + cw / 2 + 4:.0f},{top - 4:.0f}) rotate(-90)">{esc(c)}</text>'
        )
    out.append(_colour_scale(left, bottom + 14, scale_w, lo, hi, percent, sparse=min_n > 0 and counts is not None))
    for i, r in enumerate(row_labels):
        y = top + i * ch
        out.append(f'<text x="{left - 4:.1f}" y="{y + ch / 2 + 4:.0f}" text-anchor="end">{esc(r)}</text>')
        for j, v in enumerate(grid[i]):
            x = left + j * cw
            n = counts[i][j] if counts is not None else None
            sparse = n is not None and n < min_n and not math.isnan(v)
            fill = SPARSE if sparse else _color(v, lo, hi)
            tip = f"{esc(r)} / {esc(col_labels[j])}: {_text(v, percent)}" + ("" if n is None else f" (n={n})")
            out.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{cw - 1}" height="{ch - 1}" fill="{fill}">'
                f"<title>{tip}{' too few samples' if sparse else ''}</title></rect>"
            )
            if percent and not math.isnan(v):
                color = "#fff" if v > 0.6 and not sparse else "#000"
                out.append(
                    f'<text x="{x + cw / 2:.1f}" y="{y + 13:.1f}" text-anchor="middle" fill="{color}">'
                    f"{100 * v:.1f}</text>"
                )
                if n is not None:
                    out.append(
                        f'<text x="{x + cw / 2:.1f}" y="{y + 25:.1f}" text-anchor="middle" font-size="9" '
                        f'fill="{color}">n={n}</text>'
                    )
    out.append("</svg>")
    return "".join(out)
