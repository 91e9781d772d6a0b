"""Image loading and CLIP preprocessing, against transformers' PIL-backend CLIPImageProcessor."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from cultengine.checkpoint import load_checkpoint
from cultengine.image import ClipImageProcessor, content_hash
from cultengine.image_files import load_image
from cultengine.models import family_for

# Our processor repeats transformers' arithmetic step by step (uint8 PIL resize, float64 rescale, float32
# normalise), so the outputs are expected to be bitwise equal; the tolerance only guards BLAS-free noise.
TOL = 1e-6

CONFIGS = {
    "llava": {"size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28}, "resample": 3},
    "bilinear-odd-crop": {"size": {"shortest_edge": 33}, "crop_size": {"height": 31, "width": 27}, "resample": 2},
    "crop-larger-than-resize": {"size": {"shortest_edge": 20}, "crop_size": {"height": 28, "width": 24}},
    "fixed-size-no-crop": {
        "size": {"height": 30, "width": 26},
        "do_center_crop": False,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    },
}


def _image(w, h, mode, seed):
    rng = np.random.default_rng(seed)
    if mode == "P":
        img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").convert("P")
        img.info["transparency"] = 7
        return img
    bands = len(Image.new(mode, (1, 1)).getbands())
    arr = rng.integers(0, 256, (h, w, bands), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if bands == 1 else arr, mode)


IMAGES = [
    (37, 23, "RGB"),
    (23, 37, "RGBA"),
    (301, 199, "RGB"),
    (13, 9, "L"),
    (64, 64, "LA"),
    (29, 31, "P"),
    (40, 17, "CMYK"),
]


@pytest.fixture(scope="module")
def hf_processor_cls():
    t = transformers
    # transformers 5's default CLIPImageProcessor is the torchvision ("fast") one; the PIL one is the
    # reference (transformers 4: the slow class, use_fast=False).
    pil = getattr(t, "CLIPImageProcessorPil", None)
    return pil or (lambda **kw: t.CLIPImageProcessor(use_fast=False, **kw))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_transformers_clip_processor(name, hf_processor_cls):
    cfg = CONFIGS[name]
    ours, theirs = ClipImageProcessor(cfg, backend="pil"), hf_processor_cls(**cfg)
    for i, (w, h, mode) in enumerate(IMAGES):
        img = _image(w, h, mode, seed=i)
        expected = torch.as_tensor(np.asarray(theirs(img, return_tensors="np")["pixel_values"][0]))
        got = ours(img)
        assert got.dtype == torch.float32 and got.shape == expected.shape, (name, mode, got.shape)
        assert (got - expected).abs().max().item() <= TOL, (name, w, h, mode)


def test_tiny_checkpoint_processor_config(tiny_llama, tmp_path):
    ours = ClipImageProcessor.from_pretrained(tiny_llama)
    assert ours(_image(50, 31, "RGB", 0)).shape == (3, 28, 28)
    # No preprocessor_config.json: fall back to the vision tower's image size.
    d = shutil.copytree(tiny_llama, tmp_path / "c")
    (d / "preprocessor_config.json").unlink()
    proc = family_for(load_checkpoint(d)).image_processor
    assert proc(_image(50, 31, "RGB", 0)).shape == (3, 28, 28)


def test_load_from_path_bytes_and_pil(tmp_path):
    img = _image(20, 10, "RGB", 1)
    f = tmp_path / "x.png"
    img.save(f)
    data = f.read_bytes()
    for src in (f, str(f), data, bytearray(data), img):
        out = load_image(src)
        assert out.size == (20, 10) and np.array_equal(np.asarray(out.convert("RGB")), np.asarray(img))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="not found.*nope.jpg"):
        load_image(tmp_path / "nope.jpg")
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="notes.jpg"):
        load_image(bad)
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        _image(64, 64, "RGB", 2).save(buf, fmt)
        cut = tmp_path / f"cut.{fmt.lower()}"
        cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        with pytest.raises(ValueError, match=f"cut.{fmt.lower()}"):
            load_image(cut)
    with pytest.raises(ValueError, match="bytes"):
        load_image(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="unsupported image"):
        load_image(123)


def test_content_hash():
    a = torch.rand(3, 28, 28, generator=torch.Generator().manual_seed(0))
    h = content_hash(a)
    assert 0 <= h < 2**64 and h == content_hash(a.clone())
    b = a.clone()
    b[1, 2, 3] += 1e-3
    assert content_hash(b) != h
    assert content_hash(a.reshape(3, 14, 56)) != h  # same bytes, different shape
