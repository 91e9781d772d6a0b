"""Reports of the studies: a markdown file and a self-contained HTML page (tables and plots: `plots`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .. import provenance
from ..plots import PAGE_STYLE, esc, markdown_html

DEMO_NOTE = (
    "This model is the demo checkpoint (random weights): whatever it shows is noise, not culture. "
    "A correct test finds nothing here; the run demonstrates the pipeline."
)


def write_report(
    out_dir: str | Path,
    name: str,
    title: str,
    sections: list[tuple[str, str, str]],
    notes: Sequence[str] = (),
    run: dict | None = None,
) -> None:
    """Write `name`.md and `name`.html; each section is (heading, markdown body, html body). `notes` are
    highlighted under the title (e.g. the demo checkpoint warning); `run` is the provenance section."""
    out_dir = Path(out_dir)
    run_md = "\n".join(provenance.markdown(run)) if run else ""
    md = [f"# {title}", ""] + [f"> {n}\n" for n in notes] + [f"## {h}\n\n{m}\n" for h, m, _ in sections]
    (out_dir / f"{name}.md").write_text("\n".join(md) + "\n" + run_md, encoding="utf-8")
    body = "".join(f"<p class='note'>{esc(n)}</p>\n" for n in notes)
    body += "".join(f"<h2>{esc(h)}</h2>\n{x}\n" for h, _, x in sections) + markdown_html(run_md)
    page = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{PAGE_STYLE}</style></head>"
        f"<body><h1>{esc(title)}</h1>\n{body}</body></html>\n"
    )
    (out_dir / f"{name}.html").write_text(page, encoding="utf-8")
