"""The run loop with a deterministic stand-in engine: run directory, resume, shards, config guard."""

import json

import pytest

from bench_helpers import FakeEngine, bench_args
from cultengine import runlog
from cultengine.bench import results
from cultengine.bench.run import RunError, run


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CULTENGINE_CACHE", str(tmp_path / "cache"))


class Counting:
    def __init__(self):
        self.engines = []

    def __call__(self, model, device, dtype):
        self.engines.append(FakeEngine())
        return self.engines[-1]

    @property
    def scored(self):
        return sum(e.calls for e in self.engines)


def metrics_of(run_dir):
    s = json.loads((run_dir / "summary.json").read_text())
    return {k: v for k, v in s.items() if k not in ("run", "config")}


def test_default_run_writes_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(bench_args(output_dir=str(out)), make_engine=Counting()) == 0
    names = {p.name for p in out.iterdir()}
    assert {"results.jsonl", "summary.json", "report.md", "report.html", "config.json"} <= names
    recs = list(runlog.read(out / "results.jsonl"))
    assert len(recs) == len({r["id"] for r in recs}) == 272
    r = recs[0]
    assert {"id", "prompt_hash", "prediction", "choice_scores", "correct", "timings", "groups"} <= set(r)
    s = json.loads((out / "summary.json").read_text())
    assert s["demo"] and s["samples"]["evaluated"] == 272 and s["samples"]["skipped"] == 0
    assert set(s["by"]["continent"]) == {"Africa", "Asia", "Europe", "North America", "South America", "Oceania"}
    assert s["western_gap"]["western"]["n"] > 0
    assert s["run"]["engine"]["prefix_cache_hit_rate"] == 0.5
    text = capsys.readouterr().out
    assert "chance level" in text and "report.html" in text


def test_resume_after_kill_matches_straight_run(tmp_path):
    straight, killed = tmp_path / "a", tmp_path / "b"
    run(bench_args(output_dir=str(straight), batch=50), make_engine=Counting())
    run(bench_args(output_dir=str(killed), batch=50), make_engine=Counting())
    # simulate a kill: 100 finished lines and a torn one, no summary yet
    lines = (killed / "results.jsonl").read_text().splitlines(keepends=True)
    (killed / "results.jsonl").write_text("".join(lines[:100]) + lines[100][:30])
    (killed / "summary.json").unlink()
    eng = Counting()
    run(bench_args(output_dir=str(killed), batch=50), make_engine=eng)
    assert eng.scored == 4  # 172 samples left in batches of 50
    recs = list(runlog.read(killed / "results.jsonl"))
    assert len(recs) == len({r["id"] for r in recs}) == 272
    assert metrics_of(killed) == metrics_of(straight)
    nothing = Counting()
    run(bench_args(output_dir=str(killed), batch=50), make_engine=nothing)
    assert nothing.engines == []  # everything finished: no engine is even built


def test_shards_merge_to_single_run(tmp_path, capsys):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    run(bench_args(output_dir=str(single), circular=True), make_engine=Counting())
    run(bench_args(output_dir=str(sharded), circular=True, shard="1/2"), make_engine=Counting())
    assert not (sharded / "summary.json").exists()
    assert "still to run" in capsys.readouterr().err
    run(bench_args(output_dir=str(sharded), circular=True, shard="0/2"), make_engine=Counting())
    assert [p.name for p in results.result_files(sharded)] == ["results.jsonl"]
    assert metrics_of(sharded) == metrics_of(single)
    assert (sharded / "results.jsonl").read_text().count("\n") == 272
    s = metrics_of(single)
    assert "acc_vanilla" in s["overall"] and s["overall"]["acc"] <= s["overall"]["acc_vanilla"]


def test_generate_scoring_and_changed_command_refused(tmp_path):
    out = tmp_path / "g"
    run(bench_args(output_dir=str(out), scoring="generate", limit=20), make_engine=Counting())
    s = json.loads((out / "summary.json").read_text())
    assert s["overall"]["n"] == 20 and "acc_norm" not in s["overall"]
    with pytest.raises(RunError, match="different scoring.*--overwrite"):
        run(bench_args(output_dir=str(out), scoring="loglik", limit=20), make_engine=Counting())


def test_bad_rows_and_unlabeled_data(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(
        json.dumps({"id": "a", "question": "Capital of Peru?", "options": ["Lima", "Quito"], "country": "Peru"})
        + "\n"
        + json.dumps({"id": "b", "question": "No options"})
        + "\n"
        + "{broken\n"
    )
    out = tmp_path / "u"
    run(bench_args(output_dir=str(out), data=[str(f)]), make_engine=Counting())
    s = json.loads((out / "summary.json").read_text())
    assert s["samples"]["skipped"] == 2 and s["samples"]["unlabeled"] == 1
    assert "no accuracy" in s["note"]
    assert json.loads((out / "predictions.json").read_text())["a"] in (0, 1)
