"""A weight index (or a symlink) can never make the loader open a file outside the checkpoint folder."""

import json
import shutil

import pytest

from cultengine.checkpoint import CheckpointError, load_checkpoint


def _index(d, shard):
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))


@pytest.fixture
def ckpt(tiny_llama, tmp_path):
    return shutil.copytree(tiny_llama, tmp_path / "models" / "ckpt")


def test_index_naming_a_file_outside_the_checkpoint_is_refused(ckpt, tmp_path):
    outside = tmp_path / "models" / "x.safetensors"
    shutil.copy(ckpt / "model.safetensors", outside)
    for shard in ("../x.safetensors", str(outside), "sub/../../x.safetensors"):
        _index(ckpt, shard)
        with pytest.raises(CheckpointError, match="lies outside the checkpoint folder"):
            load_checkpoint(ckpt)
    _index(ckpt, 7)
    with pytest.raises(CheckpointError, match="weight_map values must be file names, got 7"):
        load_checkpoint(ckpt)


def test_symlink_resolving_outside_is_refused(ckpt, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    (ckpt / "model.safetensors").rename(outside)
    (ckpt / "model.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match="model.safetensors: a link to .* outside the checkpoint folder"):
        load_checkpoint(ckpt)
    _index(ckpt, "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: a link to .* outside the checkpoint folder"):
        load_checkpoint(ckpt)


def test_hub_cache_snapshot_links_into_its_blobs_still_load(tiny_llama, tmp_path):
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = shutil.copytree(tiny_llama, repo / "snapshots" / "abc123")
    (repo / "blobs").mkdir()
    (snap / "model.safetensors").rename(repo / "blobs" / "deadbeef")
    (snap / "model.safetensors").symlink_to("../../blobs/deadbeef")
    ck = load_checkpoint(snap)
    assert ck.has("model.language_model.embed_tokens.weight")
    assert ck.tensor("model.language_model.embed_tokens.weight").numel() > 0
