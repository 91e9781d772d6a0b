"""`--ray-replicas 2` on a local Ray cluster (CPU, the demo checkpoint): the benchmark samples answered by two
engine replicas give the records and summary of one process, and a driver killed part-way resumes with every
sample answered exactly once; the CulturalGround pipeline's chunks decided by two replicas give the rows and
summary of one process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray.data  # noqa: F401  (in the [test] extra: these tests never skip)

REPO = Path(__file__).resolve().parents[1]
ARGS = ("--limit", "48", "--batch", "8", "--threads", "1")


def env(cache):
    e = dict(os.environ, CULTENGINE_CACHE=str(cache), PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0")
    e.pop("WORLD_SIZE", None)
    return e


def bench(out, *extra):
    return [sys.executable, "-m", "cultengine.cli", "bench", "--device", "cpu", "--out", str(out), *ARGS, *extra]


def records(run_dir):
    lines = (Path(run_dir) / "results.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def rounded(x):
    """Floats to 4 decimals, all the way down: the replicas batch samples differently, which moves a choice's
    log-likelihood in its 7th digit (matmul shapes), never an answer."""
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    return [rounded(v) for v in x] if isinstance(x, list) else x


def metrics_of(run_dir):
    s = json.loads((Path(run_dir) / "summary.json").read_text())
    return rounded({k: v for k, v in s.items() if k not in ("run", "config")})


def answers(run_dir):
    """Each sample's answer, without the timing fields."""
    return {r["id"]: rounded({k: v for k, v in r.items() if k != "timings"}) for r in records(run_dir)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def single(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    p = subprocess.run(bench(out), env=env(cache), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_two_replicas_answer_as_one_process(cache, single, tmp_path):
    out = tmp_path / "ray"
    p = subprocess.run(
        bench(out, "--ray-replicas", "2"), env=env(cache), capture_output=True, text=True, timeout=900, cwd=REPO
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert answers(out) == answers(single)
    assert metrics_of(out) == metrics_of(single)


def test_a_killed_driver_resumes_with_each_sample_once(cache, single, tmp_path):
    out = tmp_path / "ray"
    cmd = bench(out, "--ray-replicas", "2")
    p = subprocess.Popen(cmd, env=env(cache), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    res, deadline = out / "results.jsonl", time.time() + 600
    while time.time() < deadline and p.poll() is None:
        if res.exists() and res.read_text().count("\n") >= 8:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (out / "summary.json").exists()
    done = subprocess.run(cmd, env=env(cache), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    ids = [r["id"] for r in records(out)]
    assert len(ids) == len(set(ids)) == len(answers(single))
    assert answers(out) == answers(single) and metrics_of(out) == metrics_of(single)


def test_ground_chunks_on_two_replicas_decide_as_one_process(cache, tmp_path):
    from PIL import Image

    from cultengine.bench import demo_checkpoint

    demo = str(demo_checkpoint.ensure(tmp_path / "ckpt"))
    for name, color in (("market.png", (200, 30, 30)), ("temple.png", (30, 30, 200))):
        Image.new("RGB", (64, 48), color).save(tmp_path / name)
    entities = [
        {"id": f"e{i}", "entity": e, "country": c, "image": img, "properties": props}
        for i, (e, c, img, props) in enumerate(
            [
                ("sushi", "Japan", "market.png", {"country_of_origin": "Japan", "made_from": "rice"}),
                ("temple", "Peru", "temple.png", {"located_in": "Cusco"}),
                ("tango", "Argentina", "market.png", {"country_of_origin": "Argentina"}),
                ("pho", "Vietnam", "temple.png", {"made_from": "rice noodles", "country_of_origin": "Vietnam"}),
            ]
        )
    ]
    (tmp_path / "ents.jsonl").write_text("".join(json.dumps(r) + "\n" for r in entities))

    def ground(out, *extra):
        cmd = [sys.executable, "-m", "cultengine.cli", "ground", "--model", demo, "--device", "cpu", "--out", str(out)]
        cmd += ["--input", str(tmp_path / "ents.jsonl"), "--languages", "en,es", "--chunk-size", "1", "--threads", "1"]
        p = subprocess.run([*cmd, *extra], env=env(cache), capture_output=True, text=True, timeout=900, cwd=REPO)
        assert p.returncode == 0, p.stderr[-3000:]
        rows = [json.loads(x) for x in (out / "ground.jsonl").read_text().splitlines()]
        summary = json.loads((out / "summary.json").read_text())
        return {r["id"]: rounded(r) for r in rows}, summary

    one_rows, one = ground(tmp_path / "one")
    two_rows, two = ground(tmp_path / "two", "--ray-replicas", "2")
    assert len(one_rows) == 12 and two_rows == one_rows
    assert rounded(two) == rounded(one)


def _ray_workers() -> list[int]:
    """Pids of the Ray actor processes that hold an engine replica."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and cmd.startswith("ray::MapWorker") and "_Replica" in cmd:
            pids.append(int(proc.name))
    return pids


def test_a_killed_replica_is_replaced_and_each_sample_answered_once(cache, single, tmp_path):
    out = tmp_path / "ray"
    p = subprocess.Popen(
        bench(out, "--ray-replicas", "2"), env=env(cache), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    res, deadline, killed = out / "results.jsonl", time.time() + 600, None
    while time.time() < deadline and p.poll() is None and killed is None:
        if res.exists() and res.read_text().count("\n") >= 8 and (workers := _ray_workers()):
            killed = workers[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    assert killed is not None, "no replica was found to kill before the run ended"
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:].decode(errors="replace")
    ids = [r["id"] for r in records(out)]
    assert len(ids) == len(set(ids)) == len(answers(single))
    assert answers(out) == answers(single) and metrics_of(out) == metrics_of(single)
