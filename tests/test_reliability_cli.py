"""Every CLI error a user can make or meet: one line on stderr, exit code 2, no traceback (`--debug` shows it).

Each case runs `python -m cultengine.cli` in its own process, as a user would; none gets as far as
loading a model, except the full-disk case, which runs with a stand-in engine.
"""

import itertools
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# Runs the CLI with a fault injected: a read-only folder (even for root) or a disk that fills up mid-run.
FAULTS = f"""
import errno, pathlib, sys
sys.path.insert(0, {str(TESTS)!r})
fault, argv = sys.argv[1], sys.argv[2:]
if fault == "read-only":
    real_open, real_mkdir = pathlib.Path.open, pathlib.Path.mkdir
    def refuse(self):
        return OSError(errno.EROFS, "Read-only file system", str(self))
    def open_(self, mode="r", *a, **k):
        if "ro" in self.parts and set(mode) & set("wax+"):
            raise refuse(self)
        return real_open(self, mode, *a, **k)
    def mkdir(self, *a, **k):
        if "ro" in self.parts and not self.exists():
            raise refuse(self)
        return real_mkdir(self, *a, **k)
    pathlib.Path.open, pathlib.Path.mkdir = open_, mkdir
else:
    import cultengine.engine, cultengine.runlog
    from bench_helpers import FakeEngine
    def full(self, records):
        raise OSError(errno.ENOSPC, "No space left on device")
    cultengine.engine.Engine, cultengine.runlog.ResultLog.write = FakeEngine, full
from cultengine.cli import main
sys.exit(main(argv))
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model = d / "model"  # enough of a checkpoint for the checks that come before loading it
    model.mkdir()
    (model / "config.json").write_text("{}")
    (d / "noconfig").mkdir()
    (d / "badconfig").mkdir()
    (d / "badconfig" / "config.json").write_text("{not json")
    (d / "badckpt").mkdir()
    (d / "badckpt" / "config.json").write_text(json.dumps({"architectures": ["NoSuchModel"]}))
    row = {"id": "a", "question": "Capital of Peru?", "options": ["Lima", "Quito"], "answer": "A"}
    (d / "good.jsonl").write_text(json.dumps(row) + "\n")
    (d / "corrupt.json").write_text("[{")
    (d / "bare.json").write_text('"a string"')
    (d / "empty.jsonl").write_text("")
    (d / "table.jsonl").write_text("id,question,answer\n1,Capital of Peru?,A\n")
    (d / "afile").write_text("x")
    (d / "ro").mkdir()
    return d


_runs = itertools.count()


def bench(d, *args, model="model", data="good.jsonl", out=None):
    out = out or f"run{next(_runs)}"  # the cases run side by side: each has its own output dir
    return [
        "bench",
        "--device",
        "cpu",
        "--model",
        str(d / model),
        "--data",
        str(d / data),
        "--out",
        str(d / out),
        *args,
    ]


def run_cli(argv, cache, fault=None):
    env = dict(os.environ, CULTENGINE_CACHE=str(cache))
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-c", FAULTS, fault, *argv] if fault else [sys.executable, "-m", "cultengine.cli", *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


CASES = {
    "batch 0": (lambda d: bench(d, "--batch", "0"), "--batch: must be at least 1, got 0"),
    "limit -1": (lambda d: bench(d, "--limit", "-1"), "--limit: must be at least 1, got -1"),
    "unknown flag": (lambda d: bench(d, "--bogus"), "unrecognized arguments: --bogus"),
    "missing checkpoint": (lambda d: bench(d, model="nowhere"), "no such checkpoint directory"),
    "not a checkpoint": (lambda d: bench(d, model="noconfig"), r"not a checkpoint \(no config.json\)"),
    "corrupt config": (lambda d: bench(d, model="badconfig"), "config.json is unreadable"),
    "bad checkpoint": (lambda d: bench(d, model="badckpt"), "NoSuchModel"),
    "missing data": (lambda d: bench(d, data="nothing.jsonl"), "nothing.jsonl: no such file"),
    "corrupt data": (lambda d: bench(d, data="corrupt.json"), "corrupt.json: not valid JSON"),
    "bare json": (lambda d: bench(d, data="bare.json"), "bare.json: a .json benchmark file holds a list"),
    "empty data": (lambda d: bench(d, data="empty.jsonl"), "empty.jsonl: no benchmark rows could be read"),
    "csv as jsonl": (lambda d: bench(d, data="table.jsonl"), "table.jsonl: no benchmark rows.*Readable formats"),
    "output is a file": (lambda d: bench(d, out="afile"), "afile is a file, not a directory"),
    "validate missing": (lambda d: ["data", "validate", str(d / "nothing.jsonl")], "benchmark file not found"),
}


def test_cli_errors_are_one_line_with_exit_code_2(files, tmp_path):
    with ThreadPoolExecutor(4) as pool:
        procs = dict(zip(CASES, pool.map(lambda c: run_cli(c[0](files), tmp_path), CASES.values()), strict=True))
    for name, (_, why) in CASES.items():
        p = procs[name]
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2, (name, p.returncode, p.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("cultengine"), (name, p.stderr[-2000:])
        assert re.search(why, lines[0]), (name, lines[0])


def test_read_only_and_full_output_dirs(files, tmp_path):
    p = run_cli(bench(files, out="ro/run"), tmp_path, fault="read-only")
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr[-2000:]
    assert "ro/run is not writable: Read-only file system" in p.stderr
    p = run_cli(bench(files, out="full"), tmp_path, fault="disk-full")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert lines[-1].startswith("cultengine: error: cannot write to --out") and "No space left" in lines[-1]
    assert sum("error" in line for line in lines) == 1  # above it only the progress bar


def test_second_run_on_a_locked_output_dir_names_the_owner(files, tmp_path):
    run_dir = files / "locked"
    run_dir.mkdir()
    holder = subprocess.Popen(  # stands for a run in progress: holds the run directory's lock
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "f.write(f'{os.getpid()}\\n'); f.flush(); print('locked', flush=True); sys.stdin.read()",
            str(run_dir / ".lock"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        p = run_cli(bench(files, out="locked"), tmp_path)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr[-2000:]
    assert f"is in use by process {holder.pid}" in p.stderr


def test_debug_shows_the_traceback(files, tmp_path):
    p = run_cli(["--debug", *bench(files, model="nowhere")], tmp_path)
    assert p.returncode == 1 and "Traceback" in p.stderr and "RunError: --model" in p.stderr
    p = run_cli([*bench(files, model="nowhere"), "--debug"], tmp_path)  # anywhere on the command line
    assert "Traceback" in p.stderr
