"""The command line answers fast: help, version and argument errors before torch is imported; every option says
what it does and its default; commands that cannot work on this data or machine are refused before the model
loads, in one line."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cultengine
from cultengine import cli

HEAVY = ("torch", "numpy", "PIL", "transformers", "pyarrow", "jinja2", "triton", "fastapi")
COMMAND_LINES = [
    [],
    ["--help"],
    ["--version"],
    *(
        [cmd, "--help"]
        for cmd in ("bench", "data", "values", "stories", "ground", "analyze", "profile", "compare", "serve")
    ),
    ["data", "convert", "--help"],
    ["analyze", "stories", "--help"],
    ["bench", "--batch", "0"],  # argument errors
    ["stories", "--out", "x"],
    ["profile", "--num-requests", "many"],
    ["profile", "--output-len", "exp:0"],
    ["stories", "--out", "o", "--concepts", "c", "--images", "i", "--temperatures", "0.3,hot"],
    ["no-such-command"],
]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(cultengine.__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}


def _cultengine(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cultengine.cli", *argv],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
        **kwargs,
    )


def test_help_version_and_argument_errors_import_nothing_heavy():
    script = f"""
import contextlib, io, json, sys
from cultengine.cli import main
codes = []
for argv in {COMMAND_LINES!r}:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            codes.append(main(argv))
        except SystemExit as e:
            codes.append(e.code)
print(json.dumps({{"codes": codes, "heavy": sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))}}))
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert result["heavy"] == []
    errors = len([a for a in COMMAND_LINES if a and a[-1] not in ("--help", "--version")])
    assert result["codes"] == [0] * (len(COMMAND_LINES) - errors) + [2] * errors


def test_bare_command_prints_help():
    p = _cultengine()
    assert p.returncode == 0
    assert p.stdout.startswith("usage: cultengine") and "bench" in p.stdout and "stories" in p.stdout


def test_version():
    p = _cultengine("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"cultengine {cli.version()}"
    assert cli.version() == cultengine.__version__ == "0.1.0"


def _parsers(parser: argparse.ArgumentParser, name: str = "cultengine"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_option_has_help_and_shows_its_default():
    undocumented, no_default = [], []
    for name, parser in _parsers(cli.build_parser()):
        help_text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction | argparse._SubParsersAction):
                continue
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            if not action.help:
                undocumented.append(label)
            elif action.default not in (None, False) and "default" not in " ".join(action.help.split()):
                if f"(default: {action.default})" not in help_text:
                    no_default.append(label)
    assert undocumented == []
    assert no_default == []


@pytest.mark.parametrize("command", ["values", "stories", "ground"])
def test_studies_have_a_description(command):
    p = _cultengine(command, "--help")
    assert p.returncode == 0
    description = p.stdout.split("\n\n")[1]
    assert not description.startswith("options:") and len(description.split()) > 20


def test_a_suite_that_fits_no_row_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from cultengine.bench import run

    def no_engine(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(run, "_default_engine", no_engine)
    out = tmp_path / "run"
    assert cli.main(["bench", "--suite", "vqa", "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("cultengine: error: --suite vqa does not fit this data: none of its ")
    assert "multiple choice (run it with --suite mcq)" in err[0]
    assert not (out / "config.json").exists() and not (out / "results.jsonl").exists()


def test_profile_of_a_7b_preset_on_a_cpu_is_refused_at_once(monkeypatch, capsys):
    from cultengine import profile

    def no_checkpoint(*a, **k):
        raise AssertionError("the preset checkpoint was built")

    monkeypatch.setattr(profile, "preset_checkpoint", no_checkpoint)
    assert cli.main(["profile", "--model", "llava-1.5-7b", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs CUDA" in err[0] and "--allow-cpu" in err[0] and "--dry-run" in err[0]


def test_profile_dry_run_of_a_preset_still_works_on_a_cpu(capsys):
    assert cli.main(["profile", "--model", "llava-1.5-7b", "--device", "cpu", "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["weight_gib"] > 10


class _Built(Exception):
    """Raised by the stand-in Engine once the command has built it."""


@pytest.fixture
def engine_kwargs(monkeypatch) -> dict:
    """The keyword arguments the command builds its Engine with (the command stops there)."""
    seen: dict = {}

    def build(model, **kwargs):
        seen.update(kwargs, model=str(model))
        raise _Built

    monkeypatch.setattr(cultengine, "Engine", build)
    from cultengine.bench import run

    monkeypatch.setattr(
        run,
        "_default_engine",
        lambda model, device, dtype, threads=None, tensor_parallel_size=1: build(
            model, threads=threads, tensor_parallel_size=tensor_parallel_size
        ),
    )
    return seen


def _study_inputs(tmp_path: Path) -> dict[str, Path]:
    from PIL import Image

    (tmp_path / "items.jsonl").write_text(json.dumps({"id": "q1", "question": "Q?", "options": ["a", "b"]}) + "\n")
    (tmp_path / "human.csv").write_text("item_id,country,distribution\nq1,Peru,0.5|0.5\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "entities.jsonl").write_text(json.dumps({"entity": "E", "country": "Peru"}) + "\n")
    return {name: tmp_path / name for name in ("items.jsonl", "human.csv", "a.png", "entities.jsonl")}


@pytest.mark.parametrize("command", ["values", "stories", "ground", "profile", "bench"])
def test_threads_and_tensor_parallel_size_reach_the_engine(command, engine_kwargs, tmp_path):
    f = _study_inputs(tmp_path)
    out = str(tmp_path / "out")
    argv = {
        "values": ["values", "--out", out, "--items", str(f["items.jsonl"]), "--human", str(f["human.csv"])],
        "stories": ["stories", "--out", out, "--concepts", "rain", "--images", str(f["a.png"])],
        "ground": ["ground", "--out", out, "--input", str(f["entities.jsonl"])],
        "profile": ["profile", "--device", "cpu"],
        "bench": ["bench", "--device", "cpu", "--limit", "2", "--out", out],
    }[command]
    assert cli.main([*argv, "--threads", "3", "--tensor-parallel-size", "2"]) == 2  # the stand-in engine stops it
    assert engine_kwargs["threads"] == 3 and engine_kwargs["tensor_parallel_size"] == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["stories", "--concepts", "rain", "--images", "missing.png"], "--images: missing.png: no such image file"),
        (["ground", "--input", "missing.jsonl"], "--input missing.jsonl: no such file"),
        (["values", "--items", "missing.jsonl", "--human", "h.csv"], "missing.jsonl"),
    ],
)
def test_study_inputs_are_checked_before_the_model_loads(argv, message, engine_kwargs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main([*argv, "--out", "out"]) == 2
    assert message in capsys.readouterr().err and engine_kwargs == {}


def test_bad_temperatures_are_an_argument_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["stories", "--out", "o", "--concepts", "c", "--images", "i", "--temperatures", "0.3,hot"])
    assert e.value.code == 2 and "expected comma-separated numbers" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, prog, close",
    [
        (["bench", "--modle", "ckpt"], "cultengine bench", "--model"),
        (["data", "validate", "x.csv", "--formt", "csv"], "cultengine data validate", "--format"),
        (
            ["stories", "--out", "o", "--concepts", "c", "--images", "i", "--temprature", "1"],
            "cultengine stories",
            "--temperatures",
        ),
        (["ground", "--out", "o", "--input", "i", "--zzzzzz", "1"], "cultengine ground", None),
    ],
)
def test_an_unknown_flag_points_at_its_own_commands_help(argv, prog, close, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"{prog}: error: unrecognized arguments: {argv[-2]}") and f"(see {prog} --help)" in err
    assert (f"did you mean {close}?" in err) if close else "did you mean" not in err


@pytest.mark.parametrize("command", ["bench", "values"])
def test_a_file_given_as_model_is_not_a_directory(command, engine_kwargs, tmp_path, capsys):
    f = _study_inputs(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 8)
    argv = {
        "values": [
            "values",
            "--out",
            str(tmp_path / "o"),
            "--items",
            str(f["items.jsonl"]),
            "--human",
            str(f["human.csv"]),
        ],
        "bench": ["bench", "--out", str(tmp_path / "o")],
    }[command]
    assert cli.main([*argv, "--model", str(weights)]) == 2
    err = capsys.readouterr().err
    assert f"--model {weights}: not a directory" in err and f"perhaps --model {tmp_path}" in err
    assert engine_kwargs == {}


def test_a_broken_pipe_is_not_an_error(tmp_path):
    """`cultengine data validate FILE | head`: the reader leaving early ends the command quietly, status 0."""
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps({"id": str(i), "question": "Q?", "answer": "x"}) + "\n" for i in range(50)))
    p = subprocess.Popen(
        [sys.executable, "-m", "cultengine.cli", "data", "validate", str(f)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    p.stdout.close()  # before the command writes anything: its first write meets a closed pipe
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 0 and err == ""


def test_ctrl_c_is_one_line_saying_what_was_kept_and_how_to_resume(tmp_path, monkeypatch, capsys):
    from cultengine.bench import run as bench_run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_run, "_evaluate", interrupted)
    out = tmp_path / "run"
    assert cli.main(["bench", "--device", "cpu", "--limit", "4", "--out", str(out), "--quiet"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == (
        f"cultengine: interrupted; the results written so far are kept in {out.resolve()}; "
        "run the same command again to resume"
    )


def test_where_outputs_go_is_spelled_out_in_every_command():
    """`--out` names the output location of every command; the spellings it replaced still work, with a note."""
    spellings = {}
    for name, parser in _parsers(cli.build_parser()):
        for action in parser._actions:
            if action.help != argparse.SUPPRESS and {"--out", "--output", "--output-dir", "--output-path"} & set(
                action.option_strings
            ):
                spellings[name] = [s for s in action.option_strings if s.startswith("--")]
    commands = ("bench", "values", "stories", "ground", "compare", "data convert", "data sample")
    assert {f"cultengine {c}" for c in commands} <= set(spellings)
    assert all(s == ["--out"] for s in spellings.values()), spellings


@pytest.mark.parametrize(
    "argv,dest,old",
    [
        (["bench", "--output-dir", "runs/x"], "output_dir", "--output-dir"),
        (["data", "convert", "a.csv", "--output", "b.jsonl"], "output", "--output"),
        (["data", "sample", "a.csv", "-n", "2", "--output", "b.jsonl"], "output", "--output"),
    ],
)
def test_old_output_spellings_are_accepted_with_a_note(argv, dest, old, capsys):
    args = cli.build_parser().parse_args(argv)
    assert getattr(args, dest) == argv[argv.index(old) + 1]
    assert f"note: {old} is now spelled --out" in capsys.readouterr().err


def test_an_output_file_is_still_required(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["data", "convert", "a.csv"])
    assert "-o/--out" in capsys.readouterr().err
