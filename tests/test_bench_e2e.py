"""End to end against the real Engine and the demo checkpoint (CPU): default run, SIGKILL + resume,
two-process torchrun (gloo) merge."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def env(cache):
    e = dict(os.environ, CULTENGINE_CACHE=str(cache), PYTHONUNBUFFERED="1")
    e.pop("WORLD_SIZE", None)
    return e


def bench(*args):
    return [sys.executable, "-m", "cultengine.cli", "bench", "--device", "cpu", *args]


def metrics_of(run_dir):
    s = json.loads((Path(run_dir) / "summary.json").read_text())
    return {k: v for k, v in s.items() if k not in ("run", "config")}


def ids(run_dir):
    lines = (Path(run_dir) / "results.jsonl").read_text().splitlines()
    return [json.loads(x)["id"] for x in lines]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def straight(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    t = time.time()
    p = subprocess.run(bench("--out", str(out)), env=env(cache), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p, time.time() - t


def test_default_run(straight):
    out, proc, seconds = straight
    assert "chance level" in proc.stdout and "report.html" in proc.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["samples"]["evaluated"] == 272 and s["samples"]["skipped"] == 0
    assert 0.1 < s["overall"]["acc"] < 0.45  # random weights: about 1/4
    assert s["run"]["engine"]["prefix_cache_hit_rate"] > 0
    # the figure the README gives for this very run
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    figure = re.search(r"with an? ([\d.]+) % prefix-cache\s+hit rate", readme).group(1)
    assert f"{100 * s['run']['engine']['prefix_cache_hit_rate']:.1f}" == figure
    assert len(ids(out)) == len(set(ids(out))) == 272
    print(f"default run took {seconds:.0f}s")
    assert seconds < 180


def test_the_demo_note_is_printed_once(straight):
    _, proc, _ = straight
    assert (proc.stdout + proc.stderr).count("chance level") == 1


def test_a_rerun_with_nothing_to_do_keeps_the_recorded_run(straight, cache, tmp_path):
    """A no-op rerun rewrites summary.json and the report: the image path, processor and engine settings (and the
    command and machine of the run that computed the results) stay as recorded."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(straight[0], out)
    before = json.loads((out / "summary.json").read_text())["run"]
    assert before["image_backend"] in ("pil", "torchvision") and before["engine_settings"]["attention_backend"]
    for missing_summary in (False, True):  # the stats log alone still knows what ran
        if missing_summary:
            (out / "summary.json").unlink()
        p = subprocess.run(
            bench("--out", str(out), "--quiet"), env=env(cache), capture_output=True, text=True, timeout=600
        )
        assert p.returncode == 0, p.stderr[-3000:]
        assert "nothing to do (272/272 samples done)" in p.stderr
        after = json.loads((out / "summary.json").read_text())["run"]
        keys = ("image_processor", "image_backend", "engine_settings")
        assert {k: after[k] for k in keys} == {k: before[k] for k in keys}
        if not missing_summary:
            assert {k: after[k] for k in ("command", "date", "machine")} == {
                k: before[k] for k in ("command", "date", "machine")
            }
        report = (out / "report.md").read_text()
        assert "not reported by this engine" not in report
        assert f"image preprocessing backend: {before['image_backend']}" in report
        assert "attention_backend" in report


def _running_with_32_results(cmd, cache, out, **popen):
    """Start the bench run and return it, still running, once 32 results are on disk."""
    p = subprocess.Popen(cmd, env=env(cache), cwd=REPO, **popen)
    res = out / "results.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if res.exists() and res.read_text().count("\n") >= 32:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run finished before 32 results were written"
    return p


def test_sigkill_then_resume(cache, straight, tmp_path):
    out = tmp_path / "run"
    cmd = bench("--out", str(out), "--batch", "16")
    p = _running_with_32_results(cmd, cache, out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (out / "summary.json").exists()
    done = subprocess.run(cmd, env=env(cache), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(ids(out)) == sorted(ids(straight[0]))
    assert metrics_of(out) == metrics_of(straight[0])


def test_ctrl_c_says_in_one_line_what_was_kept_and_a_rerun_resumes(cache, straight, tmp_path):
    out = tmp_path / "run"
    cmd = bench("--out", str(out), "--batch", "16", "--quiet")
    p = _running_with_32_results(cmd, cache, out, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 130
    assert stderr.strip() == (
        f"cultengine: interrupted; the results written so far are kept in {out.resolve()}; "
        "run the same command again to resume"
    )
    done = subprocess.run(cmd, env=env(cache), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"resuming: \d+/272 samples already done", done.stderr)
    assert sorted(ids(out)) == sorted(ids(straight[0])) and metrics_of(out) == metrics_of(straight[0])


def test_torchrun_two_processes_merge(cache, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    args = ("--limit", "64", "--batch", "16")
    p = subprocess.run(
        bench("--out", str(single), *args), env=env(cache), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr[-3000:]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        "-m",
        "cultengine.cli",
        "bench",
        "--device",
        "cpu",
        "--out",
        str(multi),
        *args,
    ]
    p = subprocess.run(cmd, env=env(cache), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(ids(multi)) == sorted(ids(single))
    assert [f.name for f in multi.glob("results*.jsonl")] == ["results.jsonl"]
    assert metrics_of(multi) == metrics_of(single)
