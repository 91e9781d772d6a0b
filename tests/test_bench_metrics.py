import math
import xml.etree.ElementTree as ET

from cultengine.bench import metrics, report


def rec(i, correct, country="Japan", region="Eastern Asia", western=False, category="flags", norm=None):
    return {
        "id": str(i),
        "correct": correct,
        "correct_norm": correct if norm is None else norm,
        "western": western,
        "groups": {
            "country": country,
            "region": region,
            "continent": "Asia",
            "category": category,
            "question_type": "t",
            "language": "en",
        },
    }


def sample():
    return [
        rec(0, True),
        rec(1, False),
        rec(2, True, norm=False),
        rec(3, True, "France", "Western Europe", True, "geography"),
        rec(4, True, "France", "Western Europe", True),
        {"id": "5", "error": "boom", "correct": None},
    ]


def test_figures_and_stderr():
    f = metrics.figures(sample()[:3], "mcq")
    assert f["n"] == 3 and math.isclose(f["acc"], 2 / 3, abs_tol=1e-6)
    assert math.isclose(f["acc_stderr"], math.sqrt((2 / 3) * (1 / 3) / 2), abs_tol=1e-6)
    assert math.isclose(f["acc_norm"], 1 / 3, abs_tol=1e-6)


def test_summary_groups_gap_and_counts():
    s = metrics.summarize(sample(), [{"id": "x", "reason": "missing image"}], "mcq")
    assert s["samples"] == {
        "evaluated": 5,
        "labeled": 5,
        "unlabeled": 0,
        "skipped": 2,
        "skipped_rows": 1,
        "engine_errors": 1,
    }
    wilson_2_of_2 = [0.34238, 1.0]  # Wilson 95 %: 2 / 2 -> (0.3424, 1)
    assert s["by"]["country"]["France"] == {
        "n": 2,
        "acc": 1.0,
        "acc_stderr": 0.0,
        "acc_ci": wilson_2_of_2,
        "acc_norm": 1.0,
        "acc_norm_stderr": 0.0,
        "acc_norm_ci": wilson_2_of_2,
        "ci_method": "wilson",
        "clusters": 2,
    }
    assert s["by"]["region"]["Eastern Asia"]["n"] == 3
    gap = s["western_gap"]
    assert gap["metric"] == "acc" and math.isclose(gap["gap"], 1 - 2 / 3, abs_tol=1e-5)
    assert s["by_category_region"]["geography"]["Western Europe"]["n"] == 1


def test_unlabeled_claims_no_accuracy():
    s = metrics.summarize([{"id": "a", "correct": None, "groups": {}}], [], "mcq")
    assert s["overall"] == {"n": 0} and "no accuracy" in s["note"]


def test_reports_render_valid_svg():
    s = metrics.summarize(sample(), [], "mcq")
    s["config"] = {"suite": "mcq", "scoring": "loglik", "circular": False, "data": ["x.jsonl"]}
    s["demo"] = True
    md = report.markdown(s)
    assert "chance level" in md and "## By region" in md and "Western vs non-Western" in md
    page = report.html_report(s)
    svgs = page.split("<figure>")[1:]
    assert len(svgs) == 4  # region bars, category bars, heatmap, worst countries
    for svg in svgs:
        ET.fromstring(svg.split("</figure>")[0])  # well-formed XML
    assert report.worst(s["by"]["country"], "acc")[0][0] == "Japan"
