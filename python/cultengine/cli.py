"""`cultengine` command line: each subcommand lives beside the code it drives.

Errors a user can fix (bad flags, missing or unreadable files, an unusable output folder, a bad
checkpoint) print one line, `cultengine: error: ...`, and exit with status 2; `--debug` (anywhere on
the command line) shows the traceback instead.

Building the parser imports only argparse-level modules (every command's `register` too): `--help` and
argument errors come before torch or any model is loaded; a command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys

from . import console

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default after its help (unless the help names it, or there is none); descriptions and
    epilogs written on several lines keep their lines, one-line ones are wrapped."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip():
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (argparse prints the whole usage first); the help shows defaults."""

    def __init__(self, *args, **kwargs):
        kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        if extras and getattr(ns, "_unknown_parser", None) is None:  # the innermost command's parser is first
            ns._unknown_parser = self
        return ns, extras

    def parse_args(self, args=None, namespace=None):
        """Unknown arguments are reported by the (sub)command they were given to, with the closest option."""
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = getattr(ns, "_unknown_parser", None) or self
            options = list(parser._option_string_actions)
            flags = [a.split("=")[0] for a in extras if a.startswith("--")]
            close = [m for a in flags for m in difflib.get_close_matches(a, options, 1)]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            parser.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        if hasattr(ns, "_unknown_parser"):
            del ns._unknown_parser
        return ns


def version() -> str:
    """The installed distribution's version, else the package's own (a source tree on the path)."""
    from importlib import metadata

    try:
        return metadata.version("cultengine")
    except metadata.PackageNotFoundError:
        from . import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    from . import compare, profile, serve
    from .bench import cli as bench_cli
    from .studies import cli as studies_cli

    parser = _Parser(
        prog="cultengine",
        description="High-throughput evaluation of vision-language models on cultural benchmarks.",
    )
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    parser.add_argument("--version", action="version", version=f"cultengine {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
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


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit raises no second broken pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    args = parser.parse_args([a for a in argv if a != "--debug"])
    if args.command is None:  # `cultengine` alone: what it can do
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C: one line, what is kept, how to go on
        if debug:
            raise
        print(
            f"\ncultengine: interrupted{'; ' + console.interrupt_note() if console.interrupt_note() else ''}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `cultengine data validate ... | head`: the reader has what it wanted
        _quiet_stdout()
        return 0
    except Exception as e:
        if debug:
            raise
        hint = "" if isinstance(e, ValueError | OSError) else " (run with --debug for the traceback)"
        print(f"cultengine: error: {_one_line(e)}{hint}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
