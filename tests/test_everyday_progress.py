"""Long commands show progress on a terminal (not with --quiet), flush results as they finish so a kill loses at
most the batch in flight, say how much a resumed run had done, and end with where their outputs are."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import cultengine
from terminal import run_with_terminal_stderr


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(cultengine.__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}


def _with_terminal_stderr(argv: list[str]) -> tuple[int, str, str]:
    """`cultengine argv` with stderr on a pseudo-terminal: (exit code, stdout, stderr)."""
    return run_with_terminal_stderr([sys.executable, "-m", "cultengine.cli", *argv], env=_env(), timeout=300)


@pytest.fixture
def bench_file(tmp_path) -> Path:
    path = tmp_path / "tiny.jsonl"
    rows = [{"id": f"q{i}", "question": f"Question {i}?", "options": ["yes", "no"], "answer": "A"} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_data_convert_shows_progress_on_a_terminal(bench_file, tmp_path):
    out = tmp_path / "out.jsonl"
    code, stdout, stderr = _with_terminal_stderr(["data", "convert", str(bench_file), "-o", str(out)])
    assert code == 0
    assert "5/5" in stderr and "row/s" in stderr and "100%" in stderr
    assert stdout.strip() == f"wrote 5 rows to {out.resolve()} (0 skipped)"


def test_quiet_hides_the_progress(bench_file, tmp_path):
    out = tmp_path / "out.parquet"
    code, stdout, stderr = _with_terminal_stderr(["data", "convert", str(bench_file), "-o", str(out), "--quiet"])
    assert code == 0 and out.is_file()
    assert stderr == "" and str(out.resolve()) in stdout


def test_no_progress_when_stderr_is_not_a_terminal(bench_file, tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "cultengine.cli", "data", "convert", str(bench_file), "-o", str(tmp_path / "o.jsonl")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert p.returncode == 0 and p.stderr == ""


def _stories_argv(model: Path, images: Path, out: Path) -> list[str]:
    return [
        "stories",
        "--model",
        str(model),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--images",
        str(images),
        "--concepts",
        "a river,a market",
        "--nationalities",
        "Kenyan,Peruvian,Thai,Polish",
        "--temperatures",
        "0.7",
        "--samples",
        "2",
        "--max-tokens",
        "48",
        "--batch",
        "4",
        "--quiet",
    ]


def _lines(path: Path) -> list[dict]:
    """The complete result lines (a kill may leave a torn last line, which a resume cuts off)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines(keepends=True):
        if line.endswith("\n"):
            out.append(json.loads(line))
    return out


def test_a_killed_stories_run_keeps_its_finished_batches_and_resumes(tiny_llama, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(images / "red.png")
    Image.new("RGB", (30, 40), (30, 30, 200)).save(images / "blue.png")
    out = tmp_path / "run"
    results = out / "results.jsonl"
    total = 2 * 2 * 4 * 2  # images x concepts x nationalities x samples
    argv = [sys.executable, "-m", "cultengine.cli", *_stories_argv(tiny_llama, images, out)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    try:
        deadline = time.monotonic() + 240
        while not _lines(results) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    kept = _lines(results)
    # flushed as each engine call (4 stories: the 2 samples of 2 prompts) finished, long before the run ended
    assert 4 <= len(kept) < total
    assert len({r["id"] for r in kept}) == len(kept) and all("text" in r for r in kept)
    prompts = {r["id"].rsplit("|s", 1)[0] for r in kept}
    done = 2 * sum(all(f"{p}|s{k}" in {r["id"] for r in kept} for k in range(2)) for p in prompts)

    resumed = subprocess.run(
        [sys.executable, "-m", "cultengine.cli", *_stories_argv(tiny_llama, images, out)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {done}/{total} stories already done, {total - done} to run" in resumed.stderr
    final = _lines(results)
    assert len(final) == len({r["id"] for r in final}) == total
    assert f"results: {results.resolve()}" in resumed.stdout
    assert f"summary: {(out / 'summary.json').resolve()}" in resumed.stdout

    again = subprocess.run(
        [sys.executable, "-m", "cultengine.cli", *_stories_argv(tiny_llama, images, out)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert again.returncode == 0 and f"nothing to do ({total}/{total} stories done)" in again.stderr


def test_values_shows_progress_and_a_rerun_has_nothing_to_do(tmp_path):
    (tmp_path / "items.jsonl").write_text(
        json.dumps({"id": "q1", "question": "Is family important?", "options": ["Yes", "No"], "topic": "t"}) + "\n"
    )
    (tmp_path / "human.csv").write_text("item_id,country,distribution\nq1,Japan,0.8|0.2\nq1,Peru,0.9|0.1\n")
    argv = ["values", "--out", str(tmp_path / "run"), "--items", str(tmp_path / "items.jsonl"), "--human",
            str(tmp_path / "human.csv")]  # fmt: skip
    code, stdout, stderr = _with_terminal_stderr(argv)
    assert code == 0
    assert "values: 100%" in stderr and "2/2" in stderr and "prompt/s" in stderr
    for name in ("results.jsonl", "summary.json", "report.html"):
        assert f"{Path(name).stem}: {(tmp_path / 'run' / name).resolve()}" in stdout
    code, _, stderr = _with_terminal_stderr([*argv, "--quiet"])
    assert code == 0 and stderr.strip() == "nothing to do (2/2 prompts done)"


def test_bench_rerun_says_how_much_was_done(tmp_path):
    argv = [sys.executable, "-m", "cultengine.cli", "bench", "--device", "cpu", "--out", str(tmp_path / "run")]
    first = subprocess.run([*argv, "--limit", "2"], capture_output=True, text=True, env=_env(), timeout=300)
    assert first.returncode == 0, first.stderr
    assert "nothing to do" not in first.stderr and "resuming" not in first.stderr
    more = subprocess.run([*argv, "--limit", "3"], capture_output=True, text=True, env=_env(), timeout=300)
    assert more.returncode == 0 and "resuming: 2/3 samples already done, 1 to run" in more.stderr
    again = subprocess.run([*argv, "--limit", "3"], capture_output=True, text=True, env=_env(), timeout=300)
    assert again.returncode == 0 and "nothing to do (3/3 samples done)" in again.stderr
    assert f"report: {(tmp_path / 'run' / 'report.html').resolve()}" in again.stdout
