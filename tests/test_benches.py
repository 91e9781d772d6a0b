"""The bench scripts run end to end at their smallest sizes (what they compute, not how fast: speed
targets live in the benches' own reports, never in tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cultengine

BENCHES = Path(__file__).resolve().parents[1] / "benches"


def run_bench(script: str, *args: str, out: Path) -> dict:
    package = Path(cultengine.__file__).resolve().parents[1]  # the cultengine under test (installed or source)
    env = {**os.environ, "PYTHONPATH": str(package), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(BENCHES / script), *args, "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = out.glob("*.json")
    return json.loads(result.read_text())


def test_generate_stories_shares_prefill_and_decode_reads(tmp_path):
    data = run_bench("bench_generate.py", "--quick", "--workload", "stories", out=tmp_path)
    workload = data["workload"]
    assert data["agreement"]["identical_fraction"] == 1.0  # greedy tokens equal transformers'
    assert workload["cascade_outputs_identical"]
    assert workload["prefill_tokens"]["shared"] < workload["prefill_tokens"]["no_sharing"]
    kv = workload["decode_kv_bytes_per_token"]
    assert 0 < kv["cascade"] < kv["no_cascade"]
    assert [r["system"] for r in data["rows"]] == ["cultengine, cascade", "cultengine, no cascade", "transformers"]


def test_bound_dry_run_measures_every_step_kind(tmp_path):
    data = run_bench("bench_bound.py", "--dry-run", out=tmp_path)
    assert data["dry_run"] and data["decode"] and data["prefill"]
    assert all(row["step_ms"] > 0 and row["bound_ms"] > 0 for row in data["decode"])
    assert set(data["decode_phases_ms"]) >= {"scheduler", "decode", "sampling", "update"}


def test_scaleout_compares_ranks_on_the_same_tokens(tmp_path):
    data = run_bench("bench_scaleout.py", "--quick", out=tmp_path)
    tp = data["tensor_parallel"]
    assert tp["tokens_identical"] and set(tp["median_tok_s"]) == {"1", "2"} and tp["ratio"] > 0
