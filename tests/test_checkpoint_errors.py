"""Checkpoint loading: layouts, dtypes, metadata, and a clear CheckpointError for each bad case."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cultengine.checkpoint import CheckpointError, canonical_weight_name, load_checkpoint
from cultengine.models import SUPPORTED_ARCHITECTURES, build_model, family_for
from cultengine.ops import Ops


@pytest.fixture
def copy_of(tmp_path):
    def make(src):
        return shutil.copytree(src, tmp_path / "ckpt")

    return make


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k].update(v)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


def test_metadata_of_a_good_checkpoint(tiny_llama, tiny_qwen2):
    ck = load_checkpoint(tiny_llama)
    family = family_for(ck)
    assert ck.architecture in SUPPORTED_ARCHITECTURES and family.text.model_type == "llama"
    assert ck.dtype == torch.float32 and ck.device == torch.device("cpu")
    assert ck.eos_token_ids == [1, 5] and family.placeholder_id == 3
    assert family.text.tie_word_embeddings and not ck.has("lm_head.weight")
    assert ck.special_tokens["bos_token"] == "<s>" and ck.chat_template
    assert ck.preprocessor_config["crop_size"] == {"height": 28, "width": 28}
    assert ck.tokenizer_path.name == "tokenizer.json"
    model = build_model(ck, Ops("torch"))
    assert model.language_model.lm_head is model.language_model.embed_tokens
    # Both layouts map to the same canonical names.
    q = load_checkpoint(tiny_qwen2)
    q_text = family_for(q).text
    assert q_text.model_type == "qwen2" and q_text.attention_bias and not q_text.tie_word_embeddings
    names_old, names_new = set(ck.weight_files), set(q.weight_files)
    assert "model.vision_tower.pre_layrnorm.weight" in names_old & names_new
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in names_old & names_new
    assert "lm_head.weight" in names_new


def test_canonical_names():
    assert canonical_weight_name("language_model.model.norm.weight") == "model.language_model.norm.weight"
    assert canonical_weight_name("language_model.lm_head.weight") == "lm_head.weight"
    assert (
        canonical_weight_name("vision_tower.vision_model.pre_layrnorm.bias") == "model.vision_tower.pre_layrnorm.bias"
    )
    assert (
        canonical_weight_name("model.vision_tower.vision_model.post_layernorm.bias")
        == "model.vision_tower.post_layernorm.bias"
    )
    assert (
        canonical_weight_name("model.multi_modal_projector.linear_1.weight")
        == "model.multi_modal_projector.linear_1.weight"
    )


def test_dtypes(tiny_llama):
    assert load_checkpoint(tiny_llama, dtype="float16").dtype == torch.float16
    assert load_checkpoint(tiny_llama, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match="unsupported dtype 'int8'"):
        load_checkpoint(tiny_llama, dtype="int8")


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="directory not found"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_checkpoint(tmp_path)


def test_malformed_json(tiny_llama, copy_of):
    d = copy_of(tiny_llama)
    (d / "config.json").write_text('{"architectures": ["LlavaForConditionalGeneration"],')
    with pytest.raises(CheckpointError, match=r"config.json: malformed JSON"):
        load_checkpoint(d)


def test_unsupported_architecture(tiny_llama, copy_of):
    d = copy_of(tiny_llama)
    _edit_json(d / "config.json", architectures=["MllamaForConditionalGeneration"])
    with pytest.raises(CheckpointError, match="'MllamaFor.*supported: LlavaForConditionalGeneration"):
        family_for(load_checkpoint(d))
    _edit_json(d / "config.json", architectures=["LlavaForConditionalGeneration"], text_config={"model_type": "gemma"})
    with pytest.raises(CheckpointError, match="text model_type 'gemma'.*llama, qwen2, mistral"):
        family_for(load_checkpoint(d))


def test_pickle_only_weights_are_refused_and_never_unpickled(tiny_llama, copy_of, tmp_path):
    d = copy_of(tiny_llama)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*safetensors only"):
        load_checkpoint(d)
    assert not marker.exists()
    (d / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match=r"no \*.safetensors"):
        load_checkpoint(d)


def test_corrupt_safetensors_and_missing_shard(tiny_llama, tiny_qwen2, tmp_path):
    d = shutil.copytree(tiny_llama, tmp_path / "a")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_checkpoint(d)
    q = shutil.copytree(tiny_qwen2, tmp_path / "b")
    (q / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard 'model-00002-of-00002.safetensors'"):
        load_checkpoint(q)


def test_missing_tensor(tiny_llama, copy_of):
    d = copy_of(tiny_llama)
    tensors = load_file(d / "model.safetensors")
    del tensors["language_model.model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model.language_model.layers.1.mlp.up_proj.weight' is miss"):
        build_model(load_checkpoint(d), Ops("torch"))


def test_untied_without_lm_head(tiny_llama, copy_of):
    d = copy_of(tiny_llama)
    _edit_json(d / "config.json", tie_word_embeddings=False, text_config={"tie_word_embeddings": False})
    with pytest.raises(CheckpointError, match="'lm_head.weight' is missing"):
        build_model(load_checkpoint(d), Ops("torch"))


def test_shape_mismatch(tiny_llama, copy_of):
    d = copy_of(tiny_llama)
    _edit_json(d / "config.json", text_config={"intermediate_size": 100})
    with pytest.raises(CheckpointError, match=r"gate_proj.weight' has shape \(96, 64\), expected \(100, 64"):
        build_model(load_checkpoint(d), Ops("torch"))


def test_missing_tokenizer(tiny_llama, copy_of):
    d = copy_of(tiny_llama)
    (d / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json not found"):
        load_checkpoint(d)


def test_unsupported_rope_scaling(tiny_llama, copy_of):
    d = copy_of(tiny_llama)
    _edit_json(d / "config.json", text_config={"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}})
    with pytest.raises(CheckpointError, match="RoPE scaling 'yarn'"):
        family_for(load_checkpoint(d))
