"""Errors that name what is wrong: a config field of the wrong type, JSON nested too deep, a template that
is not UTF-8 or a broken tokenizer.json is a CheckpointError naming the file (and the field); one bad line
or row of a data file (invalid UTF-8, a latin-1 row, a NUL byte) is skipped naming its line, and a UTF-16
CSV is read; CLI errors exit 2."""

from __future__ import annotations

import json
import random
import shutil
import warnings

import pytest

from cultengine import Engine
from cultengine.bench.data import load
from cultengine.checkpoint import CheckpointError, load_checkpoint
from cultengine.cli import main
from cultengine.studies.io import iter_records

JUNK = [None, True, -1, 2.7, "x", [], [1, "a"], {}, {"a": 1}, [[[]]]]
FIELDS = [
    "architectures",
    "text_config",
    "vision_config",
    "dtype",
    "torch_dtype",
    "eos_token_id",
    "image_token_index",
    "projector_hidden_act",
    "vision_feature_layer",
    "vision_feature_select_strategy",
    "rope_scaling",
    "tie_word_embeddings",
    "text_config.hidden_size",
    "text_config.num_attention_heads",
    "text_config.rope_scaling",
    "text_config.rope_theta",
    "text_config.vocab_size",
    "text_config.eos_token_id",
    "vision_config.image_size",
    "vision_config.patch_size",
]


@pytest.fixture
def ckpt(tiny_llama, tmp_path):
    return shutil.copytree(tiny_llama, tmp_path / "ckpt")


def _set(cfg: dict, dotted: str, value) -> None:
    *parents, key = dotted.split(".")
    for p in parents:
        cfg = cfg.setdefault(p, {}) if isinstance(cfg.get(p), dict) else {}
    cfg[key] = value


def test_config_fields_of_the_wrong_type_are_checkpoint_errors_naming_the_file(ckpt):
    """A fuzz of config.json: each field set to each kind of wrong value. The engine loads or refuses with a
    CheckpointError naming config.json (and, for the typed fields, the field), never another exception."""
    original = json.loads((ckpt / "config.json").read_text())
    rng = random.Random(3)
    cases = [(f, v) for f in FIELDS for v in JUNK]
    refused = 0
    for field, value in rng.sample(cases, 70):
        cfg = json.loads(json.dumps(original))
        _set(cfg, field, value)
        (ckpt / "config.json").write_text(json.dumps(cfg))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' own complaints about the config
            try:
                Engine(ckpt, dtype="float32", max_model_len=32)
            except CheckpointError as e:
                refused += 1
                assert "config.json" in str(e) or "generation_config.json" in str(e), (field, value, e)
            except Exception as e:  # noqa: BLE001 - the point: nothing else may escape
                pytest.fail(f"{field}={value!r}: {type(e).__name__}: {e}")
    assert refused > 30


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("architectures", {"a": 1}, "architectures must be list or null"),
        ("architectures", [3], "architectures must be a list of names"),
        ("text_config", "big", "text_config must be dict or null"),
        ("dtype", ["float32"], "dtype must be str or null"),
        ("image_token_index", 2.7, "image_token_index must be int or null"),
        ("text_config.rope_scaling", True, "text_config.rope_scaling must be dict or null"),
        ("vision_feature_layer", [], "vision_feature_layer must be a layer index"),
    ],
)
def test_typed_fields_are_named(ckpt, field, value, message):
    cfg = json.loads((ckpt / "config.json").read_text())
    _set(cfg, field, value)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"config.json: {message}"):
        load_checkpoint(ckpt)


def test_deep_nesting_bad_utf8_templates_and_broken_tokenizers_name_their_file(ckpt):
    (ckpt / "generation_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="generation_config.json: .*nested too deeply|expected a JSON object"):
        load_checkpoint(ckpt)
    (ckpt / "generation_config.json").write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    with pytest.raises(CheckpointError, match="generation_config.json: JSON nested too deeply"):
        load_checkpoint(ckpt)
    (ckpt / "generation_config.json").unlink()
    (ckpt / "chat_template.jinja").write_bytes(b"{{ messages }}\xff\xfe")
    with pytest.raises(CheckpointError, match="chat_template.jinja: not UTF-8"):
        load_checkpoint(ckpt)
    (ckpt / "chat_template.jinja").write_text("{{ messages }}")
    (ckpt / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 7}}')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="tokenizer.json"):
            Engine(ckpt)


def test_one_bad_line_of_a_jsonl_is_skipped_naming_it(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_bytes(b'{"id": "a"}\n{"id": "b\xff"}\n' + b"[" * 50_000 + b"\n" + b'{"id": "c"}\n')
    with pytest.warns(UserWarning) as caught:
        assert [r["id"] for r in iter_records(f)] == ["a", "c"]
    messages = [str(w.message) for w in caught]
    assert any("rows.jsonl:2: skipped: not UTF-8 text" in m for m in messages)
    assert any("rows.jsonl:3: skipped: malformed JSON" in m for m in messages)


def _bench_rows(tmp_path, text: bytes, name: str = "b.csv"):
    f = tmp_path / name
    f.write_bytes(text)
    return load([f])


def test_a_latin1_row_of_a_csv_is_skipped_naming_its_line_and_the_rest_read(tmp_path):
    data = b"id,question,answer\nq1,Where?,Lima\nq2,Caf\xe9?,Paris\nq3,When?,1990\n"
    ds = _bench_rows(tmp_path, data)
    assert [r.id for r in ds.rows] == ["q1", "q3"]
    (skip,) = ds.skipped
    assert skip.line == 3 and "not UTF-8 text (byte 0xe9" in skip.reason and "save the file as UTF-8" in skip.reason
    with pytest.warns(UserWarning, match="b.csv:3: skipped"):
        assert [r["id"] for r in iter_records(tmp_path / "b.csv")] == ["q1", "q3"]


def test_a_nul_byte_in_an_image_path_is_that_rows_error(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    data = b"id,image,question,answer\nq1,ok.png,Where?,Lima\nq2,o\x00k.png,Where?,x\nq3,ok.png,When?,1990\n"
    ds = _bench_rows(tmp_path, data)
    assert [r.id for r in ds.rows] == ["q1", "q3"]
    (skip,) = ds.skipped
    assert skip.line == 3 and "NUL" in skip.reason.upper()


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-8-sig"])
def test_utf16_and_bom_csvs_are_read_whole(tmp_path, encoding):
    text = "id,question,answer\nq1,Café?,París\nq2,東京?,はい\n"
    bom = {"utf-16-be": "\ufeff"}.get(encoding, "")
    ds = _bench_rows(tmp_path, (bom + text).encode(encoding))
    assert [(r.id, r.question) for r in ds.rows] == [("q1", "Café?"), ("q2", "東京?")] and not ds.skipped


def test_compare_and_columns_errors_exit_2(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "is not a finished" in capsys.readouterr().err
    (tmp_path / "d.jsonl").write_text('{"id": 1, "question": "q", "answer": "a"}\n')
    assert main(["data", "validate", str(tmp_path / "d.jsonl"), "--columns", "nonsense"]) == 2
    assert "cultengine: error:" in capsys.readouterr().err
