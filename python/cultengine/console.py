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


def probability(text: str) -> float:
    """argparse type: a number in [0, 1] (NaN is not one)."""
    try:
        p = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0 <= p <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return p


MAX_SEED = 2**64 - 1  # seeds are 64-bit: a larger (or negative) one would wrap onto another seed


def seed(text: str) -> int:
    """argparse type: a seed, an integer in [0, 2^64 - 1]."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= n <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, 2^64 - 1], got {n}")
    return n


class _RenamedFlag(argparse.Action):
    """A flag's old spelling: still accepted, storing where the new one does, after a note on stderr."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is now spelled {self.new}; the old name will go", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_out(p: argparse.ArgumentParser, help: str, old: str, short: bool = False, **kwargs) -> None:
    """`--out`, the one spelling of "where the outputs go" in every command, and the `old` spelling it replaced
    (accepted with a note); `required` is checked over both spellings."""
    group = p.add_mutually_exclusive_group(required=kwargs.pop("required", False))
    dest = kwargs.pop("dest", "out")
    group.add_argument(*(("-o",) if short else ()), "--out", dest=dest, help=help, **kwargs)
    group.add_argument(old, dest=dest, action=_RenamedFlag, new="--out", metavar=kwargs.get("metavar"))


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


def add_tensor_parallel(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tensor-parallel-size",
        type=positive_int,
        default=1,
        metavar="N",
        help="split the decoder over N processes, one per rank (CUDA: GPUs cuda:0..N-1; CPU: gloo)",
    )


def add_ray(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ray-replicas",
        type=positive_int,
        metavar="N",
        help="spread the work over N engine replicas with Ray Data (pip install 'ray[data]'); each replica is one "
        "engine of --tensor-parallel-size GPUs; this process alone writes the results",
    )
    p.add_argument(
        "--ray-address", metavar="ADDR", help="the Ray cluster to join (default: a local one started for the run)"
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


_interrupt_note: list[str] = [""]


def set_interrupt_note(message: str) -> None:
    """What a Ctrl-C leaves behind and how to go on (`cultengine: interrupted; <message>`), set by a command once
    it knows where its outputs go."""
    _interrupt_note[0] = message


def interrupt_note() -> str:
    return _interrupt_note[0]


def resumable(where: str | Path, unit: str = "results") -> None:
    """The interrupt note of a resumable command writing into `where`."""
    kept = f"the {unit} written so far are kept in {Path(where).resolve()}"
    set_interrupt_note(f"{kept}; run the same command again to resume")


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None, so that it prints as strict JSON (null)."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def default_device(device: str | None) -> str:
    """`--device` as given, else the one rule of every command: cuda when available, else cpu."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
