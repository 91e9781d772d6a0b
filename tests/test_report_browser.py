"""The HTML reports in a real headless browser (Debian's chromium): a laptop-size screenshot is taken, the page
logs no console error and loads nothing from outside, and no SVG text (axis labels, values, titles) lies
outside its SVG's box, measured by element bounds, and no two SVG texts overlap. A deliberately broken page
proves the checks can fail."""

import html
import json
import re
import shutil
import subprocess

import pytest

from cultengine import compare, plots
from cultengine.bench import metrics, report
from cultengine.studies import report as study_report

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason="no chromium binary on PATH (Debian: apt-get install chromium; scripts/test does it in CI)"
)

PROBE_HEAD = """<script>
window.__errors = [];
window.addEventListener('error',
  e => window.__errors.push(String(e.message || (e.target && (e.target.src || e.target.href)))), true);
const __err = console.error;
console.error = (...a) => { window.__errors.push(a.join(' ')); __err(...a); };
</script>"""
PROBE_TAIL = """<script>
(() => {
  const clipped = [], overlaps = [];
  for (const svg of document.querySelectorAll('svg')) {
    const s = svg.getBoundingClientRect();
    for (const t of svg.querySelectorAll('text')) {
      const r = t.getBoundingClientRect();
      if (r.left < s.left - 0.5 || r.right > s.right + 0.5 || r.top < s.top - 0.5 || r.bottom > s.bottom + 0.5)
        clipped.push(t.textContent);
    }
    const boxes = [...svg.querySelectorAll('text')].map(t => [t.textContent, t.getBoundingClientRect()]);
    for (let i = 0; i < boxes.length; i++)
      for (let j = i + 1; j < boxes.length; j++) {
        const [a, p] = boxes[i], [b, q] = boxes[j];
        const w = Math.min(p.right, q.right) - Math.max(p.left, q.left);
        const h = Math.min(p.bottom, q.bottom) - Math.max(p.top, q.top);
        if (w > 1 && h > 1) overlaps.push(a + ' / ' + b);
      }
  }
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({errors: window.__errors, clipped, overlaps,
    svgs: document.querySelectorAll('svg').length,
    texts: document.querySelectorAll('svg text').length, resources: performance.getEntriesByType('resource').length,
    overflow: document.documentElement.scrollWidth > window.innerWidth});
  document.body.appendChild(out);
})();
</script>"""


def _chromium(tmp_path, *args):
    cmd = [
        BROWSER,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1366,900",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def inspect(page: str, tmp_path, name: str) -> dict:
    """Screenshot the page and return the probe's findings (plus console errors chromium logged)."""
    probed = page.replace("<head>", "<head>" + PROBE_HEAD, 1).replace("</body>", PROBE_TAIL + "</body>", 1)
    path = tmp_path / f"{name}.html"
    path.write_text(probed, encoding="utf-8")
    shot = tmp_path / f"{name}.png"
    _chromium(tmp_path, f"--screenshot={shot}", path.as_uri())
    assert shot.is_file() and shot.stat().st_size > 10_000, "no screenshot"
    proc = _chromium(tmp_path, "--dump-dom", path.as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, proc.stderr[-2000:]
    result = json.loads(html.unescape(found.group(1)))
    result["console"] = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln and "error" in ln.lower()]
    return result


def _records():
    regions = {
        "Japan": ("Eastern Asia", "Asia", False),
        "France": ("Western Europe", "Europe", True),
        "Saint Vincent and the Grenadines": ("Caribbean", "Americas", False),
        "Bosnia and Herzegovina": ("Southern Europe", "Europe", False),
        "Kenya": ("Eastern Africa", "Africa", False),
    }
    recs, k = [], 0
    for country, (region, continent, western) in regions.items():
        for image in range(6):
            for category in ("flags", "traditional clothing and ceremonial dress"):
                k += 1
                recs.append(
                    {
                        "id": f"{k}",
                        "correct": (k * 7) % 3 == 0,
                        "correct_norm": k % 2 == 0,
                        "western": western,
                        "cluster": f"{country}-{image}",
                        "chance": 0.25,
                        "groups": {
                            "country": country,
                            "region": region,
                            "continent": continent,
                            "category": category,
                            "question_type": "recognition",
                            "language": "en",
                        },
                    }
                )
    return recs


def bench_page() -> str:
    s = metrics.summarize(_records(), [], "mcq")
    s["config"] = {
        "model_name": "llava-1.5-7b-hf",
        "suite": "mcq",
        "scoring": "loglik",
        "circular": False,
        "data": ["bench.jsonl"],
    }
    s["run"] = {"engine": {"run_seconds": 1.5}, "cultengine": "0.1.0", "command": "cultengine bench"}
    return report.html_report(s)


def test_bench_report_in_a_browser(tmp_path):
    r = inspect(bench_page(), tmp_path, "bench")
    assert r["svgs"] >= 4 and r["texts"] > 50
    assert r["errors"] == [] and r["console"] == []
    assert r["clipped"] == [], f"labels outside their plot: {r['clipped']}"
    assert r["resources"] == 0  # self-contained: nothing fetched at view time
    assert not r["overflow"]  # readable on a laptop screen without scrolling sideways


def test_study_report_in_a_browser(tmp_path):
    labels = ["Saint Vincent and the Grenadines (Caribbean)", "Japan (Eastern Asia)", "Kenya (Eastern Africa)"]
    heat = plots.heatmap(
        labels,
        ["a very long column label indeed", "b", "c"],
        [[1, 0.2, 0.1], [0.2, 1, 0.3], [0.1, 0.3, 1]],
        "similarity",
    )
    bars = plots.bar_chart(
        ["family and friends", "work"],
        [-0.05, 0.12],
        "image - text by topic (95 % CI)",
        counts=[30, 12],
        intervals=[(-0.09, -0.01), (0.02, 0.2)],
    )
    study_report.write_report(
        tmp_path, "study", "a study", [("Plots", "", heat + bars)], notes=[study_report.DEMO_NOTE]
    )
    r = inspect((tmp_path / "study.html").read_text(), tmp_path, "study")
    assert r["svgs"] == 2 and r["errors"] == [] and r["console"] == [] and r["clipped"] == []


def test_stories_heatmap_of_42_nationalities_in_a_browser(tmp_path):
    """The stories study's similarity heatmap at its real size: 42 nationalities, long region labels. Every
    label readable (none clipped, none overlapping another) and a colour scale with its end values."""
    nats = [f"Nationality{k:02d}{'-with-a-long-name' if k % 7 == 0 else ''}" for k in range(42)]
    labels = [f"{n} (South-Eastern Asia)" for n in nats]
    sim = [[1.0 if i == j else 0.2 + 0.5 * ((i * j) % 7) / 7 for j in range(42)] for i in range(42)]
    heat = plots.heatmap(labels, nats, sim, "story similarity (TF-IDF cosine), by region")
    assert "colour scale" in heat and "no value" in heat
    study_report.write_report(tmp_path, "stories", "stories", [("Plots", "", heat)], notes=[])
    r = inspect((tmp_path / "stories.html").read_text(), tmp_path, "stories")
    assert r["errors"] == [] and r["clipped"] == [] and r["overlaps"] == [], r["overlaps"][:5]
    assert not r["overflow"]


def test_the_probe_catches_clipping_overlaps_and_console_errors(tmp_path):
    broken = (
        "<!doctype html><html><head><meta charset='utf-8'></head><body>"
        "<svg xmlns='http://www.w3.org/2000/svg' width='40' height='20'><text x='2' y='14'>"
        "a label far too long for its plot</text></svg>"
        "<svg xmlns='http://www.w3.org/2000/svg' width='200' height='40'><text x='2' y='14'>first</text>"
        "<text x='8' y='16'>second</text></svg><script>console.error('boom')</script></body></html>"
    )
    r = inspect(broken, tmp_path, "broken")
    assert r["clipped"] == ["a label far too long for its plot"]
    assert r["overlaps"] == ["first / second"]
    assert "boom" in r["errors"]


def _bench_run(path, records, model):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_name": model, "suite": "mcq", "circular": False}))
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "summary.json").write_text(json.dumps(metrics.summarize(records, [], "mcq")))
    return path


def test_compare_report_in_a_browser(tmp_path):
    recs = _records()
    flipped = [{**r, "correct": not r["correct"] if i % 5 == 0 else r["correct"]} for i, r in enumerate(recs)]
    runs = [_bench_run(tmp_path / "a", recs, "llava-1.5-7b-hf"), _bench_run(tmp_path / "b", flipped, "other")]
    page = compare.write(compare.compare(runs), tmp_path / "cmp")
    r = inspect(page.read_text(), tmp_path, "compare")
    assert r["svgs"] >= 2 and r["errors"] == [] and r["console"] == [] and r["clipped"] == []
    assert r["resources"] == 0 and not r["overflow"]
