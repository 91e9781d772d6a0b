"""`cultengine bench` never reuses stale results, owns its run directory, and refuses bad input early."""

import errno
import json
import os

import pytest
from PIL import Image

from bench_helpers import FakeEngine, bench_args
from cultengine import runlog
from cultengine.bench import data
from cultengine.bench.formats import ImportOptions
from cultengine.bench.run import RunError, _open_run_dir, run


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CULTENGINE_CACHE", str(tmp_path / "cache"))


class Engines:
    """make_engine that records every engine it builds and the request ids each one scored."""

    def __init__(self):
        self.scored: list[str] = []

    def __call__(self, model, device, dtype):
        outer = self

        class Recording(FakeEngine):
            def score(self, requests, use_tqdm=False):
                outer.scored += [r["messages"][0]["content"][-1]["text"].split("\n")[0] for r in requests]
                return super().score(requests, use_tqdm)

        return Recording()


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def quiz(tmp_path, answers=("A", "A", "A", "A"), images=False):
    """Four questions; the fake engine's picks are fixed by the prompt, the answers decide the score."""
    rows = []
    for i, a in enumerate(answers):
        row = {"id": f"q{i}", "question": f"Question {i}?", "options": ["w", "x", "y", "z"], "answer": a}
        if images:
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / f"im{i}.png")
            row["image"] = f"im{i}.png"
        rows.append(row)
    return write_rows(tmp_path / "quiz.jsonl", rows)


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def fresh_metrics(tmp_path, data_file, name, **kw):
    out = tmp_path / name
    run(bench_args(output_dir=str(out), data=[str(data_file)], **kw), make_engine=Engines())
    return {k: v for k, v in summary(out).items() if k not in ("run", "config")}


def metrics(run_dir):
    return {k: v for k, v in summary(run_dir).items() if k not in ("run", "config")}


def test_resume_after_editing_answers_recomputes_the_edited_rows(tmp_path):
    f, out = quiz(tmp_path), tmp_path / "run"
    run(bench_args(output_dir=str(out), data=[str(f)]), make_engine=Engines())
    picks = {r["id"]: r["pred_index"] for r in runlog.read(out / "results.jsonl")}
    # every answer made right: a fresh run scores 100 %, a stale resume would keep the old score
    quiz(tmp_path, answers=["wxyz"[picks[f"q{i}"]] for i in range(4)])
    changed = [i for i in range(4) if picks[f"q{i}"] != 0]
    assert changed  # some answers did change
    eng = Engines()
    run(bench_args(output_dir=str(out), data=[str(f)]), make_engine=eng)
    assert sorted(eng.scored) == [f"Question {i}?" for i in changed]
    assert summary(out)["overall"]["acc"] == 1.0
    assert metrics(out) == fresh_metrics(tmp_path, f, "fresh")
    assert summary(out)["run"]["stored_results_dropped"] == {"of changed rows": len(changed)}
    assert len(list(runlog.read(out / "results.jsonl"))) == 4


def test_resume_after_editing_an_image_recomputes_its_row(tmp_path):
    f, out = quiz(tmp_path, images=True), tmp_path / "run"
    run(bench_args(output_dir=str(out), data=[str(f)]), make_engine=Engines())
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "im2.png")  # same name, new content
    eng = Engines()
    run(bench_args(output_dir=str(out), data=[str(f)]), make_engine=eng)
    assert eng.scored == ["Question 2?"]
    recs = {r["id"]: r for r in runlog.read(out / "results.jsonl")}
    assert len(recs) == 4 and metrics(out) == fresh_metrics(tmp_path, f, "fresh")


def test_resume_after_changing_the_model_is_refused_until_overwrite(tmp_path):
    f, out = quiz(tmp_path), tmp_path / "run"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"v1")
    run(bench_args(output_dir=str(out), data=[str(f)], model=str(model)), make_engine=Engines())
    (model / "model.safetensors").write_bytes(b"weights v2")  # retrained in place
    with pytest.raises(RunError, match=r"different model \(its files changed\).*--overwrite"):
        run(bench_args(output_dir=str(out), data=[str(f)], model=str(model)), make_engine=Engines())
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    with pytest.raises(RunError, match="a different model; rerun with --overwrite"):
        run(bench_args(output_dir=str(out), data=[str(f)], model=str(other)), make_engine=Engines())
    eng = Engines()
    run(bench_args(output_dir=str(out), data=[str(f)], model=str(model), overwrite=True), make_engine=eng)
    assert len(eng.scored) == 4 and len(list(runlog.read(out / "results.jsonl"))) == 4


def test_unknown_ids_and_bogus_lines_are_dropped_and_counted(tmp_path):
    f, out = quiz(tmp_path), tmp_path / "run"
    run(bench_args(output_dir=str(out), data=[str(f)]), make_engine=Engines())
    before = metrics(out)
    with (out / "results.jsonl").open("a") as fh:
        fh.write('{"id": "ghost", "correct": true}\nnot json\n[1, 2]\n{"no_id": 1}\n')
    (out / "summary.json").unlink()
    eng = Engines()
    run(bench_args(output_dir=str(out), data=[str(f)]), make_engine=eng)
    assert eng.scored == []
    assert summary(out)["run"]["stored_results_dropped"] == {"unreadable lines": 3, "with an unknown id": 1}
    assert metrics(out) == before
    assert [r["id"] for r in runlog.read(out / "results.jsonl")] == ["q0", "q1", "q2", "q3"]


def test_a_run_that_failed_before_any_result_does_not_hold_the_directory(tmp_path):
    out, empty = tmp_path / "run", write_rows(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="no benchmark rows"):
        run(bench_args(output_dir=str(out), data=[str(empty)]), make_engine=Engines())
    assert run(bench_args(output_dir=str(out), data=[str(quiz(tmp_path))]), make_engine=Engines()) == 0


def test_output_dir_is_locked_while_a_run_owns_it(tmp_path):
    f, out = quiz(tmp_path), tmp_path / "run"
    held = _open_run_dir(out, None)
    try:
        with pytest.raises(RunError, match=f"--out {out} is in use by process {os.getpid()}"):
            run(bench_args(output_dir=str(out), data=[str(f)]), make_engine=Engines())
        other_shard = _open_run_dir(out, (1, 2))  # shards of one run share the directory
        other_shard.close()
    finally:
        held.close()
    assert run(bench_args(output_dir=str(out), data=[str(f)]), make_engine=Engines()) == 0


@pytest.mark.parametrize(
    "kw, why",
    [
        ({"batch": 0}, "--batch must be a positive"),
        ({"limit": -1}, "--limit must be a positive"),
        ({"model": "/nonexistent/ckpt"}, "no such checkpoint directory"),
        ({"data": ["/nonexistent/d.jsonl"]}, "no such file"),
        ({"template": "/nonexistent/t.jinja"}, "no such file"),
        ({"image_root": "/nonexistent/imgs"}, "no such directory"),
    ],
)
def test_bad_flags_fail_before_the_model_loads(tmp_path, kw, why):
    def no_engine(*a):
        raise AssertionError("the engine must not be built")

    args = bench_args(output_dir=str(tmp_path / "run"), data=[str(quiz(tmp_path))])
    vars(args).update(kw)
    with pytest.raises(RunError, match=why):
        run(args, make_engine=no_engine)


def test_unusable_output_dirs(tmp_path, monkeypatch):
    f = quiz(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="is a file, not a directory"):
        run(bench_args(output_dir=str(tmp_path / "file"), data=[str(f)]), make_engine=Engines())

    def full(self, records):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runlog.ResultLog, "write", full)
    with pytest.raises(RunError, match="cannot write to --out .*No space left on device"):
        run(bench_args(output_dir=str(tmp_path / "run"), data=[str(f)]), make_engine=Engines())


# ------------------------------------------------------------------------------------------- misreadings
def test_byte_order_marks_are_read_in_every_text_format(tmp_path):
    tsv = tmp_path / "d.tsv"
    tsv.write_text("index\tquestion\tA\tB\tanswer\n7\tQ?\tx\ty\tB\n", encoding="utf-8-sig")
    assert [(r.id, r.answer) for r in data.load([tsv]).rows] == [("7", 1)]
    row = {"id": "a", "question": "Q?", "options": ["x", "y"], "answer": "A"}
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8-sig")
    (tmp_path / "d.json").write_text(json.dumps([row]), encoding="utf-8-sig")
    for name in ("d.jsonl", "d.json"):
        ds = data.load([tmp_path / name])
        assert [r.id for r in ds.rows] == ["a"] and not ds.skipped


def test_options_and_answers_of_the_wrong_kind_are_bad_rows(tmp_path):
    f = write_rows(
        tmp_path / "d.jsonl",
        [
            {"id": "str", "question": "Q?", "options": "Japan", "answer": "A"},
            {"id": "nested", "question": "Q?", "options": [["a"], "b"], "answer": "A"},
            {"id": "float", "question": "Q?", "options": ["x", "y", "z"], "answer": 1.7},
            {"id": "bool", "question": "Q?", "options": ["x", "y"], "answer": True},
            {"id": "empty", "question": "Q?", "options": ["x", ""], "answer": "A"},
            {"id": "ok", "question": "Q?", "options": ["x", "y", 1990], "answer": 2.0},
        ],
    )
    ds = data.load([f])
    assert [(r.id, r.options, r.answer) for r in ds.rows] == [("ok", ["x", "y", "1990"], 2)]
    why = {s.id: s.reason for s in ds.skipped}
    assert "options must be a list of strings" in why["str"] and "list of strings" in why["nested"]
    assert "not an option index" in why["float"] and "boolean" in why["bool"] and "empty option" in why["empty"]


@pytest.mark.parametrize(
    "name, text, why",
    [
        ("bare.json", '"just a string"', "holds a list of row objects"),
        ("broken.json", "[{", "not valid JSON"),
        ("empty.jsonl", "", "no benchmark rows could be read.*the file is empty.*Readable formats: canonical"),
        ("table.jsonl", "id,question,answer\n1,Q?,A\n", "no benchmark rows.*malformed JSON.*Readable formats"),
    ],
)
def test_unreadable_files_are_errors_naming_the_file_and_formats(tmp_path, name, text, why):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=why) as e:
        data.load([tmp_path / name])
    assert name in str(e.value)


# ------------------------------------------------------------------------------------------- image paths
def test_image_paths_stay_inside_the_dataset_folder(tmp_path, monkeypatch):
    ds_dir = tmp_path / "ds"
    (ds_dir / "img").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")
    Image.new("RGB", (4, 4)).save(ds_dir / "img" / "in.png")
    (ds_dir / "img" / "link.png").symlink_to(tmp_path / "outside.png")
    f = write_rows(
        ds_dir / "d.jsonl",
        [
            {"id": i, "image": im, "question": "Q?", "options": ["x", "y"], "answer": "A"}
            for i, im in [
                ("in", "img/in.png"),
                ("up", "../outside.png"),
                ("abs", str(tmp_path / "outside.png")),
                ("passwd", "/etc/passwd"),
                ("link", "img/link.png"),
            ]
        ],
    )
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(str(fp)) or real_open(fp, *a, **k))
    ds = data.load([f])
    assert [r.id for r in ds.rows] == ["in"]
    assert {s.id: "outside the dataset folder" in s.reason for s in ds.skipped} == dict.fromkeys(
        ["up", "abs", "passwd", "link"], True
    )
    assert "--allow-absolute-image-paths" in ds.skipped[0].reason
    assert opened == [str(ds_dir / "img" / "in.png")]  # nothing outside was opened
    # --image-root: relative paths resolve under it instead
    ds = data.load([f], opts=ImportOptions(image_root=tmp_path))
    assert [r.id for r in ds.rows] == ["abs"] and ds.rows[0].images == [str(tmp_path / "outside.png")]
    # --allow-absolute-image-paths trusts the file's paths
    ds = data.load([f], opts=ImportOptions(allow_outside_images=True))
    assert sorted(r.id for r in ds.rows) == ["abs", "in", "link", "up"]
    assert [s.id for s in ds.skipped] == ["passwd"]  # not an image: skipped as unreadable
