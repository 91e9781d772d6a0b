"""`cultengine` command line: each subcommand lives beside the code it drives.

Errors a user can fix (bad flags, missing or unreadable files, an unusable output folder, a bad
checkpoint) print one line, `cultengine: error: ...`, and exit with status 2; `--debug` (anywhere on
the command line) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

EXIT_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (argparse prints the whole usage first)."""

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import compare, profile, serve
    from .bench import cli as bench_cli
    from .studies import cli as studies_cli

    parser = _Parser(
        prog="cultengine",
        description="High-throughput evaluation of vision-language models on cultural benchmarks.",
    )
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench_cli.register(sub)  # bench, data
    studies_cli.register(sub)  # values, stories, ground, analyze
    profile.register(sub)
    compare.register(sub)
    serve.register(sub)
    return parser


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.strerror:  # "[Errno 2] No such file or directory: 'x'" -> "x: No such ..."
        text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    # Errors of our own checks read as sentences; anything else says what it was.
    return text if isinstance(e, ValueError | OSError) else f"{type(e).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        raise
    except Exception as e:
        if debug:
            raise
        hint = "" if isinstance(e, ValueError | OSError) else " (run with --debug for the traceback)"
        print(f"cultengine: error: {_one_line(e)}{hint}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
