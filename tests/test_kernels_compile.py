"""Every kernel launch the engine makes compiles for a GPU (sm_90), checked on a machine without one.

Triton's CPU interpreter (how CI runs the kernel tests) accepts code its compiler rejects, so the kernel
tests alone could pass here and fail on the first GPU. `kernel_launches.py` records each launch's
argument types and constexprs under the interpreter and compiles them with the real compiler.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cultengine

pytest.importorskip("triton")
HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel tests compile every kernel")
def test_every_kernel_launch_compiles_for_sm90():
    package = Path(cultengine.__file__).resolve().parents[1]  # the cultengine under test (installed or source)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package), str(HERE)])}
    recorded = subprocess.run(
        [sys.executable, str(HERE / "kernel_launches.py"), "record"],
        cwd=HERE,
        env={**env, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert recorded.returncode == 0, recorded.stderr[-3000:]
    found = json.loads(recorded.stdout)
    launched = {launch["kernel"] for launch in found["launches"]}
    assert launched == set(found["kernels"]), "kernel_launches.exercise() misses a kernel"
    env.pop("TRITON_INTERPRET", None)
    compiled = subprocess.run(
        [sys.executable, str(HERE / "kernel_launches.py"), "compile"],
        cwd=HERE,
        env=env,
        input=recorded.stdout and json.dumps(found["launches"]),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert compiled.returncode == 0, compiled.stderr[-3000:]
