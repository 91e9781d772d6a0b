"""Multiple-choice options in a plain CSV: the spellings researchers use (one `options` cell holding a JSON
list or options separated by '|', or one column per option: A, B, C... as VLMEvalKit writes them, option_a...,
option_1...) all read as options, `data validate` says how each column was read, and a file without a
question column names the column it lacks."""

from __future__ import annotations

import json

import pytest

from bench_helpers import FakeEngine, bench_args, png_bytes
from cultengine.bench import data, formats
from cultengine.bench.run import RunError, run
from cultengine.cli import main


def _csv(tmp_path, text: str, name: str = "t.csv"):
    (tmp_path / "a.png").write_bytes(png_bytes())
    f = tmp_path / name
    f.write_text(text, encoding="utf-8")
    return f


SPELLINGS = {
    "separator": "id,image,question,options,answer\nq1,a.png,Which?,Japan|Peru | Ghana|India,B\n",
    "json list": 'id,image,question,options,answer\nq1,a.png,Which?,"[""Japan"", ""Peru"", ""Ghana"", ""India""]",B\n',
    "python list": "id,image,question,options,answer\nq1,a.png,Which?,\"['Japan', 'Peru', 'Ghana', 'India']\",B\n",
    "A-D columns": "id,image,question,A,B,C,D,answer\nq1,a.png,Which?,Japan,Peru,Ghana,India,B\n",
    **{
        f"{prefix} columns": f"id,image,question,{','.join(prefix + x for x in xs)},answer\n"
        "q1,a.png,Which?,Japan,Peru,Ghana,India,B\n"
        for prefix, xs in (("option_", "abcd"), ("Option ", "1234"), ("choice_", "abcd"), ("option", "0123"))
    },
}


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_common_spelling_of_options_in_a_csv_reads_as_the_options(tmp_path, spelling):
    ds = data.load([_csv(tmp_path, SPELLINGS[spelling])])
    assert not ds.skipped
    [row] = ds.rows
    assert (row.options, row.answer) == (["Japan", "Peru", "Ghana", "India"], 1)
    assert not any(k.lower().startswith(("option", "choice")) or k in "ABCD" for k in row.meta)  # not metadata


def test_option_columns_take_trailing_blanks_as_fewer_options_and_refuse_a_gap(tmp_path):
    f = _csv(
        tmp_path,
        "id,image,question,A,B,C,D,answer\nthree,a.png,Q?,x,y,z,,C\ngap,a.png,Q?,x,,z,w,A\none,a.png,Q?,x,,,,A\n",
    )
    ds = data.load([f])
    assert [(r.id, r.options) for r in ds.rows] == [("three", ["x", "y", "z"]), ("one", ["x"])]
    assert [s.id for s in ds.skipped] == ["gap"] and "option column B is empty" in ds.skipped[0].reason


def test_a_single_text_is_still_not_options_and_the_message_names_the_spellings(tmp_path):
    ds = data.load([_csv(tmp_path, "id,image,question,options,answer\nok,a.png,Q?,a|b,A\nbad,a.png,Q?,Japan,A\n")])
    [bad] = ds.skipped
    assert bad.id == "bad"
    for spelling in ("JSON list", "separated by '|'", "A, B, C", "option_a"):
        assert spelling in bad.reason
    bad = data.load([_csv(tmp_path, 'id,image,question,options,answer\nok,a.png,Q?,a|b,A\nx,a.png,Q?,"[a, b",A\n')])
    assert "looks like a list but is not valid JSON" in bad.skipped[0].reason


def test_columns_mapping_reads_a_separated_options_cell(tmp_path):
    f = _csv(tmp_path, "Q,Opts,Label,img\nWhich?,x|y|z,C,a.png\n")
    opts = formats.ImportOptions(columns={"question": "Q", "options": "Opts", "answer": "Label", "image": "img"})
    [row] = data.load([f], opts=opts).rows
    assert (row.options, row.answer) == (["x", "y", "z"], 2)


def test_data_validate_says_how_each_column_was_read(tmp_path, capsys):
    f = _csv(
        tmp_path,
        "id,image,question,options,answer,country,notes\n"
        'q1,a.png,Q?,x|y,A,Japan,n\nq2,a.png,Q?,"[""x"", ""y""]",B,Peru,m\n',
    )
    assert main(["data", "validate", str(f)]) == 0
    out = capsys.readouterr().out
    assert "columns of t.csv:" in out
    lines = dict(line.strip().split(" -> ", 1) for line in out.splitlines() if " -> " in line)
    assert lines["options"] == "options (options separated by '|' in 1 row; a JSON list in text in 1 row)"
    assert lines["notes"] == "kept as metadata"
    assert lines["country"] == "country" and lines["image"] == "image" and lines["id"] == "id"
    assert lines["answer"].startswith("answer")

    g = _csv(tmp_path, "id,image,question,A,B,C,answer\nq1,a.png,Q?,x,y,z,A\n", "cols.csv")
    assert main(["data", "validate", str(g)]) == 0
    lines = dict(line.strip().split(" -> ", 1) for line in capsys.readouterr().out.splitlines() if " -> " in line)
    assert lines["A, B, C"] == "options, one column per option"
    assert "A" not in lines


def test_a_csv_without_a_question_column_names_the_missing_column(tmp_path, capsys):
    f = _csv(tmp_path, "id,image,text,options,answer\nq1,a.png,Q?,x|y,A\n")
    with pytest.raises(ValueError, match=r"no question column \(columns: id, image, text, options, answer\)"):
        data.load([f])
    assert main(["data", "validate", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no question column" in err and "--columns question=" in err


def test_an_unreadable_csv_lists_csv_among_the_readable_formats(tmp_path):
    f = _csv(tmp_path, "id,image,question,options,answer\nq1,a.png,Q?,Japan,A\n")
    with pytest.raises(ValueError, match="Readable formats: canonical JSONL/JSON/parquet/CSV") as e:
        data.load([f])
    assert "options must be a list of strings" in str(e.value)


def test_bench_runs_a_csv_with_option_columns_and_says_why_it_refuses_open_rows(tmp_path, capsys):
    f = _csv(tmp_path, "id,image,question,A,B,C,D,answer\nq1,a.png,Which?,Japan,Peru,Ghana,India,B\n")
    out = tmp_path / "run"
    assert run(bench_args(data=[str(f)], output_dir=str(out)), lambda *a: FakeEngine()) == 0
    [rec] = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert rec["id"] == "q1" and rec["chance"] == 0.25 and rec["pred_index"] in range(4)

    g = _csv(tmp_path, "id,image,question,answer\nq1,a.png,Which?,Japan\n", "open.csv")
    with pytest.raises(RunError, match="needs at least two options.*options column.*A, B, C"):
        run(bench_args(data=[str(g)], output_dir=str(tmp_path / "run2")), lambda *a: FakeEngine())
