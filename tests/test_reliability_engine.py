"""The engine's own guards (issue 10): whatever one request raises is that request's error, a call leaves
nothing scheduled, a choice may not hold the image placeholder, non-finite weights and logits are
reported, and impossible configs are CheckpointErrors naming the field."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cultengine import Engine, SamplingParams
from cultengine.checkpoint import load_checkpoint
from cultengine.errors import CheckpointError
from cultengine.models import build_model, family_for
from cultengine.ops import Ops
from tiny_checkpoints import IMAGE_TOKEN

GOOD = {"prompt": "Tell me about the festival of lights."}


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return Engine(tiny_llama, dtype="float32")


def test_lone_surrogates_fail_their_own_request(engine):
    params = SamplingParams(max_tokens=3)
    outs = engine.generate([GOOD, {"prompt": "bad \ud800 text"}, GOOD], params, use_tqdm=False)
    assert outs[0].error is None and outs[0].token_ids == outs[2].token_ids
    assert "tokenized" in outs[1].error
    scores = engine.score([{**GOOD, "choices": ["ok", "bad \udfff"]}, {**GOOD, "choices": ["a", "b"]}], use_tqdm=False)
    assert "cannot be tokenized" in scores[0].error and scores[1].error is None


def test_a_choice_holding_the_image_placeholder_is_refused(engine):
    out = engine.score([{**GOOD, "choices": ["Japan", f"{IMAGE_TOKEN} Peru"]}], use_tqdm=False)[0]
    assert "image placeholder" in out.error


def test_a_failing_call_leaves_the_scheduler_empty(engine, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "execute", boom)
    with pytest.raises(RuntimeError, match="device lost"):
        engine.generate([GOOD, GOOD], SamplingParams(max_tokens=4), use_tqdm=False)
    monkeypatch.undo()
    assert not engine.scheduler.has_unfinished() and not engine._seq_images
    assert engine.generate([GOOD], SamplingParams(max_tokens=2), use_tqdm=False)[0].error is None


def test_non_finite_logits_are_that_requests_error(engine, monkeypatch):
    real = engine.runner.compute_logits
    poisoned = engine.tokenizer.encode("festival")[-1]  # the last prompt token: its row is sampled

    def compute_logits(hidden, rows):  # NaN logits wherever the step holds the poisoned token
        logits = real(hidden, rows)
        return logits.masked_fill(torch.from_numpy(plan_has[0][rows])[:, None], float("nan"))

    plan_has = [None]
    real_execute = engine.runner.execute

    def execute(plan, synchronize=False, **kwargs):
        plan_has[0] = plan.input_ids == poisoned
        return real_execute(plan, synchronize, **kwargs)

    monkeypatch.setattr(engine.runner, "execute", execute)
    monkeypatch.setattr(engine.runner, "compute_logits", compute_logits)
    outs = engine.generate(
        [{"prompt": "festival"}, {"prompt": "Short one."}], SamplingParams(max_tokens=3), use_tqdm=False
    )
    assert "NaN or infinite logits" in outs[0].error and outs[0].samples == []
    assert outs[1].error is None and len(outs[1].token_ids) == 3
    scores = engine.score([{"prompt": "festival", "choices": ["a", "b"]}, {**GOOD, "choices": ["a"]}], use_tqdm=False)
    assert "NaN or infinite" in scores[0].error and scores[1].error is None
    monkeypatch.undo()
    assert not engine.scheduler.has_unfinished()


def _edit_config(path, **text):
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"].update(text)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("num_attention_heads", 0, "num_attention_heads must be an integer >= 1"),
        ("hidden_size", -4, "hidden_size must be an integer >= 1"),
        ("num_key_value_heads", 3, "not a multiple of num_key_value_heads 3"),
        ("rms_norm_eps", "tiny", "rms_norm_eps must be a number"),
    ],
)
def test_impossible_config_values_name_the_field(tiny_llama, tmp_path, field, value, needle):
    d = shutil.copytree(tiny_llama, tmp_path / "c")
    _edit_config(d, **{field: value})
    with pytest.raises(CheckpointError, match=needle):
        family_for(load_checkpoint(d))


def test_rope_tables_too_large_to_allocate_say_so_first(tiny_llama, tmp_path):
    d = shutil.copytree(tiny_llama, tmp_path / "c")
    _edit_config(d, max_position_embeddings=10**12)
    with pytest.raises(CheckpointError, match="too large to allocate RoPE tables"):
        build_model(load_checkpoint(d), Ops("torch"))


def test_nan_weights_are_reported_while_loading(tiny_llama, tmp_path):
    d = shutil.copytree(tiny_llama, tmp_path / "c")
    tensors = load_file(d / "model.safetensors")
    name = next(k for k in tensors if k.endswith("mlp.up_proj.weight"))
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = float("nan")
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        Engine(d, dtype="float32")
    assert np.isnan(tensors[name][0, 0].item())
