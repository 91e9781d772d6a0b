"""Append-only JSONL result logs with resume, and atomic whole-file writes (bench and studies runs).

Each finished record is one JSON line; every `ResultLog.write` (one batch) is flushed and fsync'd, so a
kill loses at most the batch in flight. Re-opening a log gives the ids already written, so a re-run
resumes where the last one stopped. A line cut short by a kill (no newline) is skipped by `read` and cut
off before the next append.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class Incomparable(ValueError):
    """Runs that `cultengine compare` cannot set side by side (not the same benchmark or study); the message
    names the difference."""


def read(path: str | Path, unreadable: list[int] | None = None) -> Iterator[dict]:
    """Stream the complete records of `path` (files of millions of lines are never held in memory).

    Lines that are not JSON (blank, or torn by an older writer that appended after them) are skipped;
    their 1-based numbers go to `unreadable` when given. A last line without newline is a cut-short write."""
    path = Path(path)
    if not path.is_file():
        return
    with path.open("rb") as f:  # bytes: a kill can also split a multi-byte character
        for n, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break  # the write of the last line was cut short
            try:
                yield json.loads(line)
            except ValueError:
                if unreadable is not None and line.strip():
                    unreadable.append(n)


def _cut_torn_tail(path: Path) -> None:
    """Truncate the bytes after the last newline, so appends start on a fresh line."""
    with path.open("r+b") as f:
        end = f.seek(0, os.SEEK_END)
        while end > 0:  # scan back in blocks: the file may be large, the torn line is short
            start = max(0, end - 65536)
            f.seek(start)
            i = f.read(end - start).rfind(b"\n")
            if i >= 0:
                end = start + i + 1
                break
            end = start
        f.truncate(end)


class ResultLog:
    """Append-only JSONL of finished records, one per `id`; `done` holds the ids written so far."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[str] = {r["id"] for r in self.read()}
        self._f = None

    def read(self) -> Iterator[dict]:
        return read(self.path)

    def write(self, records: Iterable[dict]) -> None:
        if self._f is None:  # opened on the first write, so a log that is only read is left untouched
            if self.path.is_file():
                _cut_torn_tail(self.path)
            self._f = self.path.open("a", encoding="utf-8")
        for rec in records:
            self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self.done.add(rec["id"])
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> ResultLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def atomic_write(path: str | Path, text: str) -> None:
    """Write via a temporary file and rename, so a kill never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str | Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
