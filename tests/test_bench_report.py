"""bench summary figures and report: intervals and n everywhere, clusters, chance, gap test, plot details."""

import math
import xml.etree.ElementTree as ET

import pytest

from cultengine import plots, stats
from cultengine.bench import metrics, report


def rec(i, correct, country, cluster=None, western=False, region="R", options=4):
    return {
        "id": str(i),
        "correct": correct,
        "western": western,
        "cluster": cluster,
        "chance": metrics.chance(options, False),
        "groups": {
            "country": country,
            "region": region,
            "continent": "C",
            "category": "k",
            "question_type": "t",
            "language": "en",
        },
    }


def test_every_group_has_interval_and_n():
    recs = [rec(i, i % 3 == 0, f"c{i % 5}", cluster=f"img{i // 4}") for i in range(60)]
    s = metrics.summarize(recs, [], "mcq")
    for groups in s["by"].values():
        for fig in groups.values():
            lo, hi = fig["acc_ci"]
            assert fig["n"] > 0 and lo <= fig["acc"] <= hi
    assert s["overall"]["ci_method"] == "cluster bootstrap" and s["overall"]["clusters"] == 15


def test_independent_questions_get_wilson_shared_images_a_wider_interval():
    # 12 of 40 right; each image all right or all wrong when 4 questions share it
    indep = metrics.figures([rec(i, i < 12, "x") for i in range(40)], "mcq")
    assert indep["ci_method"] == "wilson" and indep["acc_ci"] == pytest.approx(stats.wilson(12, 40), abs=1e-6)
    shared = metrics.figures([rec(i, i < 12, "x", cluster=f"img{i // 4}") for i in range(40)], "mcq")
    assert shared["ci_method"] == "cluster bootstrap" and shared["acc_effective_n"] < 15
    assert shared["acc_ci"][1] - shared["acc_ci"][0] > 1.5 * (indep["acc_ci"][1] - indep["acc_ci"][0])


def test_chance_is_the_mean_of_one_over_options_and_circular():
    recs = [rec(0, True, "x", options=2), rec(1, False, "x", options=4)]
    assert metrics.figures(recs, "mcq")["chance"] == pytest.approx((0.5 + 0.25) / 2)
    assert metrics.chance(4, circular=True) == pytest.approx(0.25**4)


def test_western_gap_interval_and_p():
    west = [rec(i, i % 10 < 9, "France", western=True) for i in range(100)]
    rest = [rec(100 + i, i % 10 < 3, "Kenya") for i in range(100)]
    gap = metrics.western_gap(west + rest, "mcq")
    assert gap["gap"] == pytest.approx(0.6) and gap["gap_ci"][0] < 0.6 < gap["gap_ci"][1]
    assert gap["gap_p"] == pytest.approx(1 / (stats.PERMUTATIONS + 1))
    assert "+60.0 points" in report.gap_line(gap) and "p = " in report.gap_line(gap)


def test_worst_countries_ties_broken_by_n():
    groups = {
        "A": {"acc": 0.0, "n": 4},
        "B": {"acc": 0.0, "n": 12},
        "C": {"acc": 0.5, "n": 2},
        "D": {"acc": 0.0, "n": 4},
    }
    assert [r[0] for r in report.worst(groups, "acc")] == ["B", "A", "D", "C"]


def test_plots_draw_intervals_chance_sparse_cells_and_n():
    bars = plots.bar_chart(
        ["a", "b"],
        [0.5, 0.2],
        "t",
        counts=[30, 3],
        percent=True,
        intervals=[(0.3, 0.7), (0.05, 0.5)],
        reference=0.25,
        min_n=10,
    )
    svg = ET.fromstring(bars)
    ns = "{http://www.w3.org/2000/svg}"
    assert len(svg.findall(f"{ns}path")) == 2  # one whisker per bar
    assert any(t.text == "chance 25.0%" for t in svg.iter(f"{ns}text"))
    fills = [r.get("fill") for r in svg.findall(f"{ns}rect") if r.get("width") not in ("360",)]
    assert plots.SPARSE in fills  # b has n = 3 < 10
    heat = plots.heatmap(["r"], ["x", "y"], [[1.0, 0.0]], "h", counts=[[25, 2]], percent=True, min_n=10)
    texts = [t.text for t in ET.fromstring(heat).iter(f"{ns}text")]
    assert "n=25" in texts and "n=2" in texts
    cells = [r for r in ET.fromstring(heat).iter(f"{ns}rect") if r.find(f"{ns}title") is not None]
    assert cells[1].get("fill") == plots.SPARSE and cells[0].get("fill") != plots.SPARSE


def test_margins_fit_the_longest_label():
    long = "Saint Vincent and the Grenadines"
    svg = ET.fromstring(plots.bar_chart([long, "b"], [0.5, 0.2], "t", percent=True))
    ns = "{http://www.w3.org/2000/svg}"
    label = next(t for t in svg.iter(f"{ns}text") if t.text == long)
    assert float(label.get("x")) >= plots.text_width(long)  # right-aligned at x: starts at x - width >= 0


def test_report_leads_with_the_summary_and_lists_methods():
    recs = [rec(i, i % 4 == 0, f"c{i % 3}", cluster=f"img{i // 2}", western=i % 2 == 0) for i in range(40)]
    s = metrics.summarize(recs, [], "mcq")
    s["config"] = {"model_name": "m", "suite": "mcq", "scoring": "loglik", "circular": False, "data": ["d"]}
    s["run"] = {
        "engine": {"run_seconds": 2.0},
        "cultengine": "0.1.0",
        "command": "cultengine bench",
        "checkpoint": {"name": "m", "path": "/m", "sha256": "ab" * 32, "demo": False},
    }
    md = report.markdown(s)
    order = [md.index(h) for h in ("## Summary", "## Overall", "## Methods", "## Run")]
    assert order == sorted(order)
    assert "95 % CI" in md and "Western minus non-Western" in md and "sha256 abababab" in md
    page = report.html_report(s)
    assert page.index("Summary") < page.index("<svg") < page.index("<table")
    assert not math.isnan(s["western_gap"]["gap_p"])
