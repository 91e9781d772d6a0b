"""The README stays true.

- Its examples that need neither a GPU nor a downloaded checkpoint (fenced as `bash cpu`) run verbatim on a CPU,
  each in a fresh folder, in the activated environment the README's first commands make (its `bin/` first on
  PATH: the `cultengine`, `python3` and `pip` that environment installed; no stand-ins), and end by printing
  where their outputs are.
- Every other shell command is checked without running it: its program exists, and its subcommand and flags are
  accepted by the real parser (`cultengine`'s own; `--help` of the others).
- Its figures come from somewhere: the benchmark tables from `benches/results/`, the default benchmark's make-up
  from the benchmark itself, line counts from the files (the prefix-cache hit rate is checked against a real run
  in `tests/test_bench_e2e.py`).
- Its markdown is clean: every code fence closed, table rows as wide as their header, repository paths that exist.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cultengine import cli
from terminal import run_with_terminal_stderr

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TEXT = README.read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```bash cpu\n(.*?)^```$", TEXT, re.S | re.M)
SHELL_BLOCKS = re.findall(r"^```bash\n(.*?)^```$", TEXT, re.S | re.M)
BIN = Path(sys.executable).parent  # the environment's bin/: what `. .venv/bin/activate` puts first on PATH
FENCE_LANGUAGES = {"bash", "bash cpu", "python", "json", "text"}
# Programs the README runs in another project (named in the command's comment), not installed here.
EXTERNAL = {"run.py": "in VLMEvalKit"}


# ------------------------------------------------------------------------------------------ markdown


def lint(text: str) -> list[str]:
    """Problems of a markdown text: unclosed or unknown code fences, table rows whose width differs from their
    header's, headings that a fence swallowed."""
    problems, fence, table = [], None, None
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if fence is None:
                fence = (n, line[3:].strip())
                if fence[1] not in FENCE_LANGUAGES:
                    problems.append(f"line {n}: code fence without a known language ({fence[1]!r})")
            elif line.strip() == "```":
                fence = None
            else:
                problems.append(f"line {n}: a code fence opens inside the one opened on line {fence[0]}")
            continue
        if fence is not None:
            if re.match(r"#{1,6} \S", line) and fence[1] in ("", "text"):  # not a comment in code
                problems.append(f"line {n}: heading inside the code block opened on line {fence[0]}")
            continue
        if line.startswith("|"):
            width = len(re.findall(r"(?<!\\)\|", line))
            if table is None:
                table = width
            elif width != table:
                problems.append(f"line {n}: table row of {width - 1} cells under a header of {table - 1}")
        else:
            table = None
    if fence is not None:
        problems.append(f"line {fence[0]}: code fence never closed")
    return problems


def test_the_readme_markdown_is_clean():
    assert lint(TEXT) == []


def test_the_lint_finds_what_it_looks_for():
    assert lint("a\n```bash\nx\n") == ["line 2: code fence never closed"]
    assert lint("```\nx\n```\n") == ["line 1: code fence without a known language ('')"]
    assert lint("```text\nx\n\n### Serving\n```\n") == ["line 4: heading inside the code block opened on line 1"]
    assert lint("| a | b |\n|---|---|\n| 1 | 2 | 3 |\n") == ["line 3: table row of 3 cells under a header of 2"]
    assert lint("| a | b |\n|---|---|\n| `x\\|y` | 2 |\n") == []


def test_the_paths_the_readme_names_exist():
    named = set(re.findall(r"`((?:tests|benches|scripts|python|docs|rust|kernels|\.ci)/[\w./-]+)`", TEXT))
    assert len(named) > 10
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert missing == []


def test_line_counts_the_readme_gives_are_the_files():
    models = REPO / "python" / "cultengine" / "models"
    for name, n in re.findall(r"`(\w+\.py)` \((\d+) lines", TEXT):
        assert len((models / name).read_text().splitlines()) == int(n), name


# ------------------------------------------------------------------------------------------ figures


def _numbers(text: str) -> list[float]:
    return [float(x.replace(",", "")) for x in re.findall(r"\d[\d,]*(?:\.\d+)?", text)]


def _recorded(figure: str, pool: list[float]) -> bool:
    """Whether a figure as printed (rounded, with thousands separators) is one of the recorded values."""
    decimals = len(figure.split(".")[1]) if "." in figure else 0
    value = float(figure.replace(",", ""))
    return any(round(x, decimals) == value for x in pool)


def _table_rows(section: str) -> list[list[str]]:
    rows = [line.strip("|").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    rows = [[cell.strip() for cell in r] for r in rows]
    return [r for r in rows if r[0] != "bench (command)"]


def _benchmarks() -> tuple[str, str]:
    section = TEXT[TEXT.index("## Benchmarks") : TEXT.index("## Development")]
    cpu, gpu = section.split("### On an NVIDIA H100")
    return cpu[: cpu.index("The generation rows were re-measured")], gpu[: gpu.index("Kernels (")]


def test_the_cpu_benchmark_table_is_what_benches_results_recorded():
    """Every figure of the CPU table's cultengine, peer and ratio columns is in benches/results/*-cpu-2cores."""
    files = sorted((REPO / "benches" / "results").glob("*-cpu-2cores.md"))
    pool = _numbers(" ".join(f.read_text() for f in files))
    pool += [x / 1000 for x in pool]  # a table in µs, the README in ms
    cpu, _ = _benchmarks()
    rows = _table_rows(cpu)
    assert len(rows) >= 7
    for row in rows:
        for figure in re.findall(r"\d[\d,]*(?:\.\d+)?", " ".join(row[1:4])):
            assert _recorded(figure, pool), (figure, row[0][:60])


def test_the_h100_throughput_rows_are_what_benches_results_recorded():
    """The H100 generation and scoring rows (not the decode-bound rows, which give the range of two runs)."""
    files = sorted((REPO / "benches" / "results").glob("*-nvidia-h100-80gb-hbm3.md"))
    pool = _numbers(" ".join(f.read_text() for f in files))
    _, gpu = _benchmarks()
    rows = [r for r in _table_rows(gpu) if r[0].startswith(("generation", "4-choice scoring"))]
    assert len(rows) == 2
    for row in rows:
        cells = re.sub(r"\((?:\d[\d.]*× )?in an earlier run[^)]*\)", "", " ".join(row[1:4]))
        for figure in re.findall(r"\d[\d,]*(?:\.\d+)?", cells):
            assert _recorded(figure, pool), (figure, row[0][:60])


def test_the_default_benchmark_is_as_the_readme_describes_it():
    from collections import Counter

    from cultengine.bench.default import questions
    from cultengine.bench.default.flags import FLAGS

    rows = questions.rows()
    m = re.search(
        r"evaluates (\d+) multiple-choice questions \((\d+) national flags.*?once for the (\d+) questions that show "
        r"it,\s+each scored over its (\d+) options",
        TEXT,
        re.S,
    )
    assert m, "the README's description of the default benchmark"
    n, flags, with_image, options = map(int, m.groups())
    assert (n, flags) == (len(rows), len(FLAGS))
    per_image = Counter(tuple(r["images"]) for r in rows if r.get("images"))
    assert set(per_image.values()) == {with_image}
    assert {len(r["options"]) for r in rows} == {options}


# ------------------------------------------------------------------------------------------ the commands


def _commands(block: str) -> list[list[str]]:
    """The simple commands of a shell block: continuations joined, comments dropped, split on && ; | &."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        cmd: list[str] = []
        for token in [*lexer, ";"]:
            if token in ("&&", ";", "|", "&", "||"):
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(token)
    return out


def _strip(cmd: list[str]) -> list[str]:
    """Without leading VAR=value assignments and the optional `[--flag value]` parts the README shows."""
    while cmd and re.fullmatch(r"[A-Za-z_]\w*=\S*", cmd[0]):
        cmd = cmd[1:]
    out, optional = [], False
    for token in cmd:
        optional = optional or token.startswith("[")
        if not optional:
            out.append(token)
        optional = optional and not token.endswith("]")
    return out


def _cultengine_parses(argv: list[str]) -> str | None:
    """None if cultengine's own parser accepts the arguments, else what it said."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            cli.build_parser().parse_args(argv)
    except SystemExit as e:
        return err.getvalue().strip() or f"exit {e.code}"
    return None


def _help(argv: list[str]) -> str:
    proc = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, (argv, proc.stderr[-2000:])
    return proc.stdout


def _flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("-") and a not in ("-", "--")]


def _program(name: str) -> str:
    """`.venv/bin/X` is this environment's X; a bare name is looked up on the activated PATH."""
    if name.startswith(".venv/bin/") or name.startswith("../.venv/bin/"):
        name = name.rsplit("/", 1)[1]
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    assert path, f"{name}: not installed"
    return str(path)


def _check_python(argv: list[str]) -> None:
    """`python3 -m MODULE ...` or `python3 SCRIPT ...`."""
    if argv[0] == "-c":
        return
    if argv[0] == "-m":
        module, rest = argv[1], argv[2:]
        if module == "cultengine.cli":
            assert _cultengine_parses(rest) is None, argv
        elif module in ("venv", "pytest", "pip"):
            help_text = _help([sys.executable, "-m", module]) if module != "venv" else ""
            assert all(f in help_text for f in _flags(rest)), argv
        else:
            help_text = _help([sys.executable, "-m", module])
            missing = [f for f in _flags(rest) if f not in help_text]
            assert missing == [], (module, missing)
        return
    script = argv[0]
    if script in EXTERNAL:
        return
    assert (REPO / script).is_file(), script
    help_text = _help([sys.executable, str(REPO / script)])
    assert [f for f in _flags(argv[1:]) if f not in help_text] == [], argv


def _check(cmd: list[str], where: str) -> None:
    cmd = _strip(cmd)
    if not cmd or cmd[0] in ("cd", ".", "source", "export"):
        return
    name, args = cmd[0], cmd[1:]
    base = name.rsplit("/", 1)[-1]
    if base == "cultengine":
        assert _cultengine_parses(args) is None, (where, cmd, _cultengine_parses(args))
    elif base in ("python", "python3"):
        _check_python(args)
    elif base == "torchrun":
        _program("torchrun")
        i = args.index("-m")
        assert all(f in _help([_program("torchrun")]) for f in _flags(args[:i])), cmd
        _check_python(args[i:])
    elif base == "pip":
        _program(name)
        assert args[0] == "install"
        help_text = _help([sys.executable, "-m", "pip", "install"])
        assert all(f in help_text for f in _flags(args[1:])), cmd
    elif base == "ruff":
        help_text = _help([_program(name), args[0]])
        assert all(f in help_text for f in _flags(args[1:])), cmd
    elif base == "cargo":
        if shutil.which("cargo") is None:
            pytest.skip("no cargo here")
        help_text = _help(["cargo", args[0]])
        before = args[1 : args.index("--")] if "--" in args else args[1:]
        assert all(f in help_text for f in _flags(before)), cmd
    else:
        path = REPO / name
        assert path.is_file() and os.access(path, os.X_OK), (where, name)


def test_the_readme_shell_commands_exist_and_their_flags_parse():
    checked = 0
    for block in SHELL_BLOCKS:
        for cmd in _commands(block):
            _check(cmd, block.splitlines()[0])
            checked += 1
    assert checked >= 20


def test_the_inline_cultengine_commands_parse():
    inline = [c for c in re.findall(r"`(cultengine [^`]+ -[^`]+)`", TEXT) if "..." not in c and "|" not in c]
    assert len(inline) >= 10
    for command in inline:
        said = _cultengine_parses(shlex.split(command)[1:])
        # an inline fragment may leave out required flags; every flag it shows must exist and parse
        assert said is None or "the following arguments are required" in said, (command, said)


def test_the_command_checks_catch_a_wrong_flag_or_program():
    with pytest.raises(AssertionError):
        _check(["cultengine", "bench", "--modle", "x"], "test")
    with pytest.raises(AssertionError):
        _check([".venv/bin/maturin", "develop"], "test")
    with pytest.raises(AssertionError):
        _check(["pip", "install", "--no-such-flag", "."], "test")


def test_the_readme_activates_the_environment_before_bare_commands():
    bare = re.finditer(r"^(?:cultengine|python3?(?! -m venv)|pip) ", TEXT, re.M)  # venv's own first, before one
    first_bare = min(m.start() for m in bare)
    activation = TEXT.find("\n. .venv/bin/activate\n")
    assert 0 < activation < first_bare


# ------------------------------------------------------------------------------------------ the cheap ones, run


def test_the_readme_marks_its_cpu_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("script", BLOCKS, ids=[re.search(r"cultengine (\w+)", b).group(1) for b in BLOCKS])
def test_readme_cpu_example_runs_verbatim(script, tmp_path):
    assert (BIN / "cultengine").is_file() and (BIN / "python3").exists(), f"{BIN} is not an installed environment"
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # what `. .venv/bin/activate` does
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", VIRTUAL_ENV=str(BIN.parent), OMP_NUM_THREADS="1")
    code, stdout, stderr = run_with_terminal_stderr(
        ["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, timeout=600
    )
    assert code == 0, stderr
    assert "100%" in stderr  # the progress bar, at its end
    printed = [Path(m) for m in re.findall(r"^\w+: (/.+)$", stdout, re.M)]
    assert printed, stdout
    assert all(path.is_file() and path.is_relative_to(work.resolve()) for path in printed)
    assert "summary.json" in {path.name for path in printed}
