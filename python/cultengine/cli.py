"""`cultengine` command line: each subcommand lives beside the code it drives."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from . import compare, profile
    from .bench import cli as bench_cli
    from .studies import cli as studies_cli

    parser = argparse.ArgumentParser(
        prog="cultengine",
        description="High-throughput evaluation of vision-language models on cultural benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench_cli.register(sub)  # bench, data
    studies_cli.register(sub)  # values, stories, ground, analyze
    profile.register(sub)
    compare.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
