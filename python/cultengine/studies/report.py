"""Reports of the studies: a markdown file and a self-contained HTML page (tables and plots: `plots`)."""

from __future__ import annotations

from pathlib import Path

from ..plots import PAGE_STYLE, esc


def write_report(out_dir: str | Path, name: str, title: str, sections: list[tuple[str, str, str]]) -> None:
    """Write `name`.md and `name`.html; each section is (heading, markdown body, html body)."""
    out_dir = Path(out_dir)
    md = [f"# {title}", ""] + [f"## {h}\n\n{m}\n" for h, m, _ in sections]
    (out_dir / f"{name}.md").write_text("\n".join(md), encoding="utf-8")
    body = "".join(f"<h2>{esc(h)}</h2>\n{x}\n" for h, _, x in sections)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<style>{PAGE_STYLE}</style></head>"
        f"<body><h1>{esc(title)}</h1>\n{body}</body></html>\n"
    )
    (out_dir / f"{name}.html").write_text(page, encoding="utf-8")
