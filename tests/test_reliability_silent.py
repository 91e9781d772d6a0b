"""Inputs that used to give a wrong result without a word (a collapsed duplicate, a NaN summary, a negative
p-value, zero rows with exit 0, a wrapped seed, a broadcast mean) are refused with an error naming them."""

from __future__ import annotations

import json
import math

import pytest

from cultengine import Engine, SamplingParams, stats
from cultengine.cli import main
from cultengine.image import ImageProcessor
from cultengine.studies import ground, stories, values


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ITEM = {"id": "q1", "question": "How important is family?", "options": ["Very", "Not"]}


def test_values_refuse_duplicate_items_and_distributions_and_nan(tmp_path):
    with pytest.raises(ValueError, match="item id 'q1' appears twice"):
        values.load_items(_jsonl(tmp_path / "items.jsonl", [ITEM, {**ITEM, "question": "another"}]))
    items = values.load_items(_jsonl(tmp_path / "items.jsonl", [ITEM]))
    (tmp_path / "h.csv").write_text("item_id,country,distribution\nq1,Japan,5|3\nq1,Japan,1|1\n")
    with pytest.raises(ValueError, match="a second distribution"):
        values.load_human(tmp_path / "h.csv", items)
    for bad in ("nan|1", "inf|1"):
        (tmp_path / "h.csv").write_text(f"item_id,country,distribution\nq1,Japan,{bad}\n")
        with pytest.raises(ValueError, match="NaN or infinity"):
            values.load_human(tmp_path / "h.csv", items)


def test_ground_refuses_duplicate_entity_ids_unknown_languages_and_bad_thresholds(tmp_path):
    ents = _jsonl(
        tmp_path / "e.jsonl",
        [{"id": "e1", "entity": "sushi", "properties": {"made_from": "rice"}}] * 2,
    )
    templates = ground.load_templates()
    with pytest.raises(ValueError, match="record 2 has the id 'e1' of record 1"):
        ground.run(None, ents, tmp_path / "run", ["en"], templates)
    with pytest.raises(ValueError, match="no template in 'xx'"):
        ground.run(None, ents, tmp_path / "run", ["en", "xx"], templates)
    for t in (2.0, -0.1, math.nan):
        with pytest.raises(ValueError, match="threshold must be a probability"):
            ground.run(None, ents, tmp_path / "run", ["en"], templates, threshold=t)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def _exit_status(argv) -> int:
    """What the shell sees: main's return value, or argparse's exit status for a flag it refuses."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--threshold", "2"], "must be in [0, 1]"),
        (["--threshold", "nan"], "must be in [0, 1]"),
        (["--languages", "xx"], "no template in 'xx'"),
    ],
)
def test_ground_cli_exits_2_naming_the_flag(tmp_path, capsys, flags, message):
    ents = _jsonl(tmp_path / "e.jsonl", [{"id": "e1", "entity": "sushi", "properties": {"made_from": "rice"}}])
    argv = ["ground", "--model", "demo", "--out", str(tmp_path / "run"), "--input", str(ents), *flags]
    assert _exit_status(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags", [["--permutations", "-5"], ["--permutations", "0"], ["--top-k", "0"]])
def test_analyze_refuses_counts_below_one(tmp_path, capsys, flags):
    assert _exit_status(["analyze", "stories", str(tmp_path), *flags]) == 2
    assert "must be" in capsys.readouterr().err
    with pytest.raises(ValueError, match="permutations must be an integer >= 1"):
        stats.mantel([[0, 1], [1, 0]], [[0, 1], [1, 0]], permutations=-5)


def test_analyze_on_a_missing_directory_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    assert main(["analyze", "stories", str(missing)]) == 2
    assert "no such directory" in capsys.readouterr().err and not missing.exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a stories run directory"):
        stories.analyze([tmp_path / "empty"])
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_stories_run_where_every_image_failed_is_an_error(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "broken.png").write_bytes(b"not a png")
    argv = ["stories", "--model", "demo", "--out", str(tmp_path / "run"), "--images", str(imgs)]
    argv += ["--concepts", "rain", "--nationalities", "Japanese,German", "--samples", "1", "--max-tokens", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "every story of this run failed" in err and "broken.png" in err
    # what failed is recorded (the summary and the error rows), so a rerun after a fix resumes from it
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert rows and all("error" in r for r in rows)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stories_total"] == len(rows)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return Engine(tiny_llama, dtype="float32", max_model_len=64)


def test_a_request_with_both_prompt_and_messages_is_refused(engine):
    req = {"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}], "choices": ["a", "b"]}
    (scored,) = engine.score(req)
    assert "'prompt' or 'messages', not both" in scored.error and not scored.choices
    (generated,) = engine.generate({k: req[k] for k in ("prompt", "messages")}, SamplingParams(max_tokens=1))
    assert "not both" in generated.error


@pytest.mark.parametrize("seed", [-1, 2**64, -(2**63)])
def test_seeds_outside_64_bits_are_refused_not_wrapped(seed):
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=seed)
    assert SamplingParams(seed=2**64 - 1).sample_seeds() != SamplingParams(seed=0).sample_seeds()


@pytest.mark.parametrize("field", ["image_mean", "image_std"])
@pytest.mark.parametrize("value", [[0.5], [0.5, 0.5], [0.5, 0.5, 0.5, 0.5], ["x", 0, 0], [math.nan, 0, 0], True])
def test_a_mean_or_std_of_the_wrong_length_is_refused(field, value):
    cfg = {"do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, field: value}
    with pytest.raises(ValueError, match=f"{field} must be a number or three"):
        ImageProcessor(cfg)
    one = ImageProcessor({"do_normalize": True, "image_mean": 0.5, "image_std": 0.25})
    assert one.mean == (0.5,) * 3 and one.std == (0.25,) * 3  # one number for all channels, as transformers


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(block_size=0),
        dict(block_size=-16),
        dict(max_model_len=-1),
        dict(max_model_len=0),
        dict(max_num_seqs=0),
        dict(max_num_batched_tokens=0),
        dict(num_blocks=0),
        dict(block_size=2.5),
    ],
)
def test_engine_sizes_below_one_are_refused_before_loading(tiny_llama, kwargs):
    (name,) = kwargs
    with pytest.raises(ValueError, match=name):
        Engine(tiny_llama, **kwargs)
