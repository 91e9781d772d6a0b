"""The README's examples that need neither a GPU nor a downloaded checkpoint (fenced as `bash cpu`) run verbatim
on a CPU, each in a fresh folder, and end by printing where their outputs are."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

import cultengine
from terminal import run_with_terminal_stderr

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```bash cpu\n(.*?)^```$", README.read_text(encoding="utf-8"), re.S | re.M)


def test_the_readme_marks_its_cpu_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("script", BLOCKS, ids=[re.search(r"cultengine (\w+)", b).group(1) for b in BLOCKS])
def test_readme_cpu_example_runs_verbatim(script, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # `cultengine` and `python3` as an installed environment has them: this interpreter, this source tree
    for name, command in (("cultengine", f'"{sys.executable}" -m cultengine.cli'), ("python3", f'"{sys.executable}"')):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        (bin_dir / name).chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(cultengine.__file__).resolve().parents[1]),
    }
    code, stdout, stderr = run_with_terminal_stderr(
        ["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, timeout=600
    )
    assert code == 0, stderr
    assert "100%" in stderr  # the progress bar, at its end
    printed = [Path(m) for m in re.findall(r"^\w+: (/.+)$", stdout, re.M)]
    assert printed, stdout
    assert all(path.is_file() and path.is_relative_to(work.resolve()) for path in printed)
    assert "summary.json" in {path.name for path in printed}
