"""Text data files (CSV, TSV, JSONL) read line by line, whatever a spreadsheet saved them as: the encoding
from the byte-order mark (UTF-8 by default, UTF-16 as Excel's "Unicode text" writes it), and a line that does
not decode is that line's error, not the whole file's. Both the benchmark reader and the studies read here.
"""

from __future__ import annotations

import codecs
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from .paths import open_regular


class BadLine(ValueError):
    """A line (or CSV row) that cannot be read; the reader reports it and goes on."""


_BOMS = ((codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"), (codecs.BOM_UTF8, "utf-8"))


def _raw_lines(path: Path) -> Iterator[tuple[bytes, str]]:
    """(line bytes without the BOM, encoding) for each line, the encoding chosen by the byte-order mark."""
    with open_regular(path, "data file") as f:
        head = f.read(4)
        encoding, skip = next(((enc, len(bom)) for bom, enc in _BOMS if head.startswith(bom)), ("utf-8", 0))
        f.seek(skip)
        if encoding.startswith("utf-16"):  # line ends are two bytes: decode whole, split after
            text = f.read().decode(encoding, errors="surrogateescape")
            for line in text.splitlines(keepends=True):
                yield line.encode("utf-8", errors="surrogateescape"), "utf-8"
            return
        for line in f:
            yield line, encoding


def lines(path: str | Path) -> Iterator[tuple[int, str | BadLine]]:
    """(1-based line number, the line's text or why it does not decode)."""
    for n, (raw, encoding) in enumerate(_raw_lines(Path(path)), 1):
        try:
            yield n, raw.decode(encoding)
        except UnicodeDecodeError as e:
            yield (
                n,
                BadLine(
                    f"not {encoding.upper()} text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                    "save the file as UTF-8"
                ),
            )


def json_lines(path: str | Path) -> Iterator[tuple[int, dict | BadLine]]:
    """(line number, object or why the line is not one) for each non-blank line of a JSONL file."""
    for n, line in lines(path):
        if isinstance(line, BadLine):
            yield n, line
        elif line.strip():
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                yield n, BadLine(f"malformed JSON: {getattr(e, 'msg', 'nested too deeply')}")
                continue
            yield n, rec if isinstance(rec, dict) else BadLine("line is not a JSON object")


def csv_rows(path: str | Path, delimiter: str = ",") -> Iterator[tuple[int, dict | BadLine]]:
    """(line number a row starts on, row as a dict or why it cannot be read) for each row after the header;
    a row spanning a line that does not decode is skipped whole. A NUL byte in a row is its error too."""
    csv.field_size_limit(sys.maxsize)  # base64 images are long
    bad: dict[int, BadLine] = {}

    def text() -> Iterator[str]:
        for n, line in lines(path):
            if isinstance(line, BadLine):
                bad[n] = line
                yield "\n"
            else:
                yield line

    reader = csv.reader(text(), delimiter=delimiter)
    header: list[str] | None = None
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # a NUL byte, an unterminated quote
            yield start, BadLine(f"unreadable CSV row: {e}")
            start = reader.line_num + 1
            continue
        end, span = reader.line_num, range(start, reader.line_num + 1)
        problem = next((bad.pop(n) for n in span if n in bad), None)
        if header is None:
            if problem is not None:
                raise problem
            header = row
        elif problem is not None:
            yield start, problem
        elif row:  # as csv.DictReader: missing fields None, extra ones in a list under None
            rec: dict = dict(zip(header, row, strict=False))
            if len(row) > len(header):
                rec[None] = row[len(header) :]
            rec.update((k, None) for k in header[len(row) :])
            yield start, rec
        start = end + 1
