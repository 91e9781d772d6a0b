"""A data file, a checkpoint folder or a dataset folder can name only files inside itself (or inside a folder
the user allowed): '..', absolute paths and symlinks out are refused, as the weights already were. A FIFO or
device where a file should be is an error, never a read that blocks."""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest
from PIL import Image

from cultengine.bench import formats
from cultengine.checkpoint import CheckpointError, load_checkpoint
from cultengine.image_files import load_image
from cultengine.paths import OutsideFolder, confined, named_by_data_file, open_regular
from cultengine.studies import ground, values

OUTSIDE_NAMES = ["../secret.png", "sub/../../secret.png", "/etc/passwd"]


@pytest.fixture
def layout(tmp_path):
    """data/ holds the data file and an image; secret.png lies beside data/."""
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 6), (1, 2, 3)).save(data / "in.png")
    Image.new("RGB", (8, 6), (9, 9, 9)).save(tmp_path / "secret.png")
    (data / "link.png").symlink_to(tmp_path / "secret.png")
    return data


@pytest.mark.parametrize("name", [*OUTSIDE_NAMES, "link.png"])
def test_a_data_file_cannot_name_a_file_outside_its_folder(layout, name):
    with pytest.raises(OutsideFolder, match="lies outside"):
        named_by_data_file(layout / "rows.csv", name)
    assert named_by_data_file(layout / "rows.csv", "in.png") == (layout / "in.png").resolve()


def test_an_allowed_media_path_admits_absolute_names_under_it_only(layout):
    root = layout.parent
    assert named_by_data_file(layout / "rows.csv", str(root / "secret.png"), root) == (root / "secret.png").resolve()
    assert named_by_data_file(layout / "rows.csv", "../secret.png", root) == (root / "secret.png").resolve()
    with pytest.raises(OutsideFolder, match="outside the allowed media path"):
        named_by_data_file(layout / "rows.csv", "/etc/passwd", root)


@pytest.mark.parametrize("name", ["a\0b.png", "x" * 5000 + ".png"])
def test_names_that_cannot_be_files_are_value_errors(tmp_path, name):
    with pytest.raises(ValueError, match="not a usable file name"):
        open_regular(tmp_path / name, "image file")
    with pytest.raises(ValueError, match="not a usable file name|cannot read"):
        load_image(str(tmp_path / name))


def test_a_symlink_loop_is_a_value_error(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(ValueError, match="symlink loop|not a usable"):
        confined(tmp_path, "a")


def test_values_images_outside_the_data_folder_are_refused_naming_the_row(layout):
    f = layout / "images.csv"
    f.write_text("country,category,image\nJapan,food,in.png\nPeru,food,../secret.png\n")
    with pytest.raises(ValueError, match=r"images.csv: row 2: image '../secret.png' lies outside"):
        values.load_images(f)
    assert values.load_images(f, layout.parent)["Peru"] == [("food", str(layout.parent / "secret.png"))]


def test_ground_drops_a_record_whose_image_leads_outside(layout):
    from test_studies_suites import ScriptedEngine

    ents = layout / "ents.jsonl"
    ents.write_text(
        "".join(
            json.dumps(
                {"id": i, "entity": "sushi", "country": "Japan", "image": img, "properties": {"made_from": "rice"}}
            )
            + "\n"
            for i, img in (("ok", "in.png"), ("bad", "../secret.png"), ("abs", "/etc/passwd"))
        )
    )
    seen = []

    def score(req):
        seen.append(req["messages"][0]["content"][0]["image"])
        return [0.0, -2.0]

    s = ground.run(ScriptedEngine(score, lambda req, k: "What is it made from?"), ents, layout / "run", ["en"])
    assert seen == [str(layout / "in.png")]  # only the image inside the folder was ever opened
    rows = [json.loads(line) for line in (layout / "run" / "ground.jsonl").read_text().splitlines()]
    bad = [r for r in rows if r["record_id"] in ("bad", "abs")]
    assert bad and all(r["drop_reason"] == "error" and "lies outside" in r["stage3"]["error"] for r in bad)
    assert s["kept"] == 1


@pytest.mark.parametrize(
    "meta", ["config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]
)
def test_checkpoint_metadata_linked_out_of_the_folder_is_refused(tiny_llama, tmp_path, meta):
    ckpt = shutil.copytree(tiny_llama, tmp_path / "ckpt")
    outside = tmp_path / f"outside-{meta}"
    if (ckpt / meta).exists():
        (ckpt / meta).rename(outside)
    else:
        outside.write_text("{{ messages }}")
    (ckpt / meta).symlink_to(outside)
    with pytest.raises(CheckpointError, match=f"{meta}: a link to .*outside the checkpoint folder"):
        load_checkpoint(ckpt)


def test_a_fifo_in_a_checkpoint_or_as_an_image_is_refused_without_blocking(tiny_llama, tmp_path):
    ckpt = shutil.copytree(tiny_llama, tmp_path / "ckpt")
    os.mkfifo(ckpt / "preprocessor_config.json.tmp")
    errors = []

    def attempt():
        for call in (lambda: load_checkpoint(ckpt), lambda: load_image(ckpt / "preprocessor_config.json.tmp")):
            try:
                call()
            except (CheckpointError, ValueError) as e:
                errors.append(str(e))

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "a read blocked on a FIFO"
    assert "not a regular file" in errors[0] and "is a FIFO, not a regular file" in errors[1]
    with pytest.raises(ValueError, match="a character device"):
        open_regular("/dev/zero", "image file")


def test_save_to_disk_metadata_naming_files_outside_is_refused(tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    for bad in ("../x.arrow", "/etc/passwd", "a/../../x.arrow", 7):
        (ds / "state.json").write_text(json.dumps({"_data_files": [{"filename": bad}]}))
        with pytest.raises(ValueError, match="state.json data file .* is not a name inside the folder"):
            formats.expand([ds])
    (ds / "state.json").unlink()
    (ds / "dataset_dict.json").write_text(json.dumps({"splits": ["../../elsewhere"]}))
    with pytest.raises(ValueError, match="dataset_dict.json split"):
        formats.expand([ds])


@pytest.mark.parametrize("rev", ["../../../etc", "/abs", ".."])
def test_a_hub_cache_ref_or_sub_path_cannot_leave_the_snapshot(tmp_path, monkeypatch, rev):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "datasets--org--name"
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / "test.jsonl").write_text('{"id": 1}\n')
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    assert formats.expand(["org/name/test.jsonl"]) == [repo / "snapshots" / "abc" / "test.jsonl"]
    with pytest.raises(ValueError, match="may not contain '..'"):
        formats.expand(["org/name/../../../../etc/passwd"])
    (repo / "refs" / "main").write_text(rev)
    with pytest.raises(ValueError, match="is not a revision"):
        formats.expand(["org/name"])
