"""`cultengine bench --model A --model B` and `cultengine compare`: two tiny random checkpoints on the
embedded benchmark, the comparison's figures, and refusals of runs that do not hold the same questions."""

import csv
import io
import json
import shutil
import xml.etree.ElementTree as ET

import pytest

from cultengine import compare, stats
from cultengine.cli import main
from test_report_browser import BROWSER, inspect


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("CULTENGINE_CACHE", str(tmp_path_factory.mktemp("cache")))
    parent = tmp_path_factory.mktemp("cmp") / "two"
    a, b = tiny_checkpoint("llama"), tiny_checkpoint("qwen2")
    argv = [
        "bench",
        "--device",
        "cpu",
        "--model",
        str(a),
        "--model",
        str(b),
        "--limit",
        "48",
        "--out",
        str(parent),
    ]
    assert main(argv) == 0
    mp.undo()
    return parent


def test_bench_many_models_ends_with_the_comparison(runs):
    dirs = sorted(p for p in runs.iterdir() if p.is_dir())
    assert [p.name for p in dirs] == [f"01-{dirs[0].name[3:]}", f"02-{dirs[1].name[3:]}"]
    for name in ("compare.json", "compare.csv", "compare.md", "compare.html"):
        assert (runs / name).is_file()
    res = json.loads((runs / "compare.json").read_text())
    assert len(res["models"]) == 2 and res["questions"] == 48 and res["metric"] == "acc"
    # the table holds the runs' own figures: the same accuracy and interval as each summary.json
    for name, d in zip(res["models"], dirs, strict=True):
        own = json.loads((d / "summary.json").read_text())["overall"]
        assert res["table"][name]["overall|all"]["acc"] == own["acc"]
        assert res["table"][name]["overall|all"]["acc_ci"] == own["acc_ci"]
        assert res["western_gap"][name]["gap_ci"] is not None


def test_paired_test_matches_the_results(runs):
    res = json.loads((runs / "compare.json").read_text())
    dirs = sorted(p for p in runs.iterdir() if p.is_dir())
    recs = [[json.loads(x) for x in (d / "results.jsonl").read_text().splitlines()] for d in dirs]
    a, b = ([bool(r["correct"]) for r in rs] for rs in recs)
    overall = res["paired"][0]["tests"][0]
    assert overall["group"] == "all" and overall["n"] == 48
    assert overall["only_a"] == sum(x and not y for x, y in zip(a, b, strict=True))
    assert overall["only_b"] == sum(y and not x for x, y in zip(a, b, strict=True))
    assert overall["value"] == pytest.approx((sum(a) - sum(b)) / 48, abs=1e-6)
    assert overall["test"] == "cluster sign-flip permutation"  # the flag questions share their image
    assert overall["low"] <= overall["value"] <= overall["high"]
    assert all(t["p_holm"] >= t["p"] for t in res["paired"][0]["tests"])
    for f in res["countries_all_fail"]:
        assert all(acc <= f["chance"] for acc in f["accuracy"].values())


def test_csv_table_and_html(runs):
    res = json.loads((runs / "compare.json").read_text())
    rows = list(csv.DictReader(io.StringIO((runs / "compare.csv").read_text())))
    assert len(rows) == 2 * len(res["table"][res["models"][0]])
    first = rows[0]
    assert first["group_key"] == "overall" and float(first["ci_low"]) <= float(first["acc"]) <= float(first["ci_high"])
    page = (runs / "compare.html").read_text()
    assert (
        "ranking" in page and "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    )
    for svg in page.split("<figure>")[1:]:
        ET.fromstring(svg.split("</figure>")[0])


def _copy(runs, tmp_path):
    dirs = sorted(p for p in runs.iterdir() if p.is_dir())
    out = [tmp_path / p.name for p in dirs]
    for src, dst in zip(dirs, out, strict=True):
        shutil.copytree(src, dst)
    return out


def _edit_jsonl(path, fn):
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in fn(lines)))


def test_compare_cli_refuses_different_question_sets(runs, tmp_path, capsys):
    a, b = _copy(runs, tmp_path)
    _edit_jsonl(b / "results.jsonl", lambda rs: rs[1:])
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "out")]) == 2  # a CLI error: exit 2
    assert "different question sets: 1 ids only in the first" in capsys.readouterr().err


def test_compare_refuses_changed_prompts_suite_and_data(runs, tmp_path):
    a, b = _copy(runs, tmp_path)

    def change_prompt(rs):
        rs[0]["prompt_hash"] = "0" * 16
        return rs

    _edit_jsonl(b / "results.jsonl", change_prompt)
    with pytest.raises(compare.Incomparable, match="1 questions differ in their prompt"):
        compare.compare([a, b])
    shutil.copy(a / "results.jsonl", b / "results.jsonl")
    summary = json.loads((b / "summary.json").read_text())
    summary["run"]["data"][0]["sha256"] = "f" * 64
    (b / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(compare.Incomparable, match="different data"):
        compare.compare([a, b])
    shutil.copy(a / "summary.json", b / "summary.json")
    config = json.loads((b / "config.json").read_text())
    config["circular"] = True
    (b / "config.json").write_text(json.dumps(config))
    with pytest.raises(compare.Incomparable, match="differ in circular"):
        compare.compare([a, b])
    with pytest.raises(compare.Incomparable, match="at least two"):
        compare.compare([a])


def test_identical_runs_have_no_difference(runs, tmp_path):
    a, _ = _copy(runs, tmp_path)
    twin = tmp_path / "twin"
    shutil.copytree(a, twin)
    res = compare.compare([a, twin])
    overall = res["paired"][0]["tests"][0]
    assert overall["value"] == 0 and overall["p"] == 1.0 and (overall["only_a"], overall["only_b"]) == (0, 0)
    assert len(set(res["models"])) == 2  # the same model name twice is told apart by its folder
    assert stats.mcnemar_exact(0, 0) == 1.0


def test_questions_an_engine_failed_on_are_left_out_of_every_model(runs, tmp_path):
    a, b = _copy(runs, tmp_path)

    def fail_first(rs):
        rs[0] = {**rs[0], "error": "image unreadable", "correct": None}
        return rs

    _edit_jsonl(b / "results.jsonl", fail_first)
    res = compare.compare([a, b])
    assert res["questions"] == 47 and res["left_out"] == 1
    assert all(fig["overall|all"]["n"] == 47 for fig in res["table"].values())
    assert "left out of every model" in "\n".join(compare.markdown_parts(res)[0])


def test_three_models_get_the_pairwise_matrix(runs, tmp_path):
    a, b = _copy(runs, tmp_path)
    twin = tmp_path / "twin"
    shutil.copytree(a, twin)
    res = compare.compare([a, b, twin])
    assert len(res["paired"]) == 3
    _, tables = compare.markdown_parts(res)
    text = "\n".join(tables)
    assert "row minus column" in text and "+0.0 (p 1.000)" in text  # a vs its twin


@pytest.mark.skipif(BROWSER is None, reason="no chromium binary on PATH")
def test_real_run_pages_in_a_browser(runs, tmp_path):
    pages = [runs / "compare.html", *sorted(runs.glob("*/report.html"))]
    for i, page in enumerate(pages):
        r = inspect(page.read_text(), tmp_path, f"page{i}")
        assert r["errors"] == r["console"] == r["clipped"] == [] and r["resources"] == 0 and not r["overflow"], page
