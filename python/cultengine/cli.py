"""`cultengine` command line: each subcommand lives beside the code it drives."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from .bench import cli as bench_cli

    parser = argparse.ArgumentParser(
        prog="cultengine",
        description="High-throughput evaluation of vision-language models on cultural benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench_cli.register(sub)  # bench, data
    for module in ("cultengine.studies.cli", "cultengine.profile"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
