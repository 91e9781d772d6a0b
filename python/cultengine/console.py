"""What the long-running commands share on the console: the `--quiet` and `--threads` flags, a progress bar
on stderr (shown only when stderr is a terminal), the note on how much a resumed run had already done, and
the closing lines saying where the outputs are.

It imports nothing heavy (tqdm only when a bar is made), so that the command line's `--help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bar (it is shown only when stderr is a terminal)"
    )


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=positive_int,
        metavar="N",
        help="CPU threads for torch (default: $OMP_NUM_THREADS if set, else the cores this process may "
        "use); on a shared machine give each concurrent run its share of the cores",
    )


def bar(
    total: int,
    *,
    initial: int = 0,
    unit: str = "sample",
    desc: str | None = None,
    quiet: bool = False,
    iterable: Iterable | None = None,
) -> Any:
    """A tqdm bar on stderr (done/total, rate, ETA), over `iterable` if given; hidden with `quiet` or when
    stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(
        iterable,
        total=total,
        initial=initial,
        unit=unit,
        desc=desc,
        file=sys.stderr,
        dynamic_ncols=True,
        disable=True if quiet else None,
    )  # None: tqdm shows it on a terminal only


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resume_note(done: int, total: int, unit: str = "") -> None:
    """How much of the work an earlier run in the same directory already did (nothing said for a fresh one)."""
    unit = f" {unit}" if unit else ""
    if total and done >= total:
        note(f"nothing to do ({done}/{total}{unit} done)")
    elif done:
        note(f"resuming: {done}/{total}{unit} already done, {total - done} to run")


def print_outputs(*paths: str | Path) -> None:
    """The closing lines, on stdout: `name: /absolute/path` for each output that exists."""
    for path in map(Path, paths):
        if path.exists():
            print(f"{path.stem}: {path.resolve()}", flush=True)
