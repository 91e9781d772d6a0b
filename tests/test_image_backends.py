"""Image preprocessing on both of transformers' paths ("pil" and "torchvision"), against transformers itself.

Pixel parity per processor and path on odd sizes, aspect ratios and modes; the backend choice against what
`AutoImageProcessor` picks; and the engine on the tiny LLaVA checkpoint with each path against transformers'
LLaVA fed the pixels of the matching transformers processor.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from cultengine import Engine, SamplingParams
from cultengine import image as ce_image
from cultengine.image import (
    ClipImageProcessor,
    SiglipImageProcessor,
    center_crop,
    fit_within_size,
    image_processor_for_checkpoint,
    pad,
    pad_to_square,
    resize_output_size,
    resolve_image_backend,
    to_channels_first,
)
from tiny_checkpoints import IMAGE_TOKEN, reference_model

pytest.importorskip("torchvision", reason="the torchvision path is tested where torchvision is installed")

PIXEL_TOL = 1e-6  # float32; both paths repeat transformers' own operations, so the outputs are bitwise equal
LOGPROB_TOL = 1e-4
BACKENDS = ("pil", "torchvision")
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def hf_processor(name: str, backend: str, **config):
    """transformers' processor `name` on `backend`, constructed explicitly (5: X / XPil; 4: XFast / X)."""
    if TRANSFORMERS_5:
        cls = getattr(transformers, name if backend == "torchvision" else name + "Pil")
    else:
        cls = getattr(transformers, name + "Fast" if backend == "torchvision" else name)
    proc = cls(**config)
    assert getattr(proc, "backend", backend) == backend
    return proc


def _image(w: int, h: int, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":  # 16-bit grey, values past 255 (PIL clips them when converting to RGB)
        return Image.fromarray(rng.integers(0, 1024, (h, w), dtype=np.uint16))
    if mode in ("P", "RGB+tRNS"):  # a transparent palette index / RGB colour, composited onto white
        img = Image.fromarray(rng.integers(0, 8, (h, w, 3), dtype=np.uint8) * 32, "RGB")
        img = img.convert("P") if mode == "P" else img
        img.info["transparency"] = 7 if mode == "P" else (32, 64, 96)
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
    (45, 30, "I;16"),
    (26, 19, "RGB+tRNS"),
    (3, 61, "RGB"),
    (211, 2, "RGBA"),
]

CLIP_CONFIGS = {
    "llava-bicubic": {"size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28}, "resample": 3},
    "bilinear-odd-crop": {"size": {"shortest_edge": 33}, "crop_size": {"height": 31, "width": 27}, "resample": 2},
    # Padding before the crop: the two paths put an odd pixel of padding on opposite sides.
    "crop-larger-than-resize": {"size": {"shortest_edge": 20}, "crop_size": {"height": 29, "width": 24}},
    "int-size-nearest": {"size": 25, "crop_size": 21, "resample": 0},
    "lanczos-exact-size": {"size": {"height": 30, "width": 26}, "do_center_crop": False, "resample": 1},
    "no-rescale": {"size": {"shortest_edge": 24}, "crop_size": 24, "do_rescale": False},
    "no-normalize": {"size": {"shortest_edge": 24}, "crop_size": 24, "do_normalize": False},
    "no-rgb-conversion": {"size": {"shortest_edge": 24}, "crop_size": 24, "do_convert_rgb": False},
    "padded-after-normalize": {"size": 20, "crop_size": 20, "do_pad": True, "pad_size": {"height": 26, "width": 23}},
}
SIGLIP_CONFIGS = {
    "default-224": {},
    "exact-size-bilinear": {"size": {"height": 30, "width": 26}, "resample": 2},
    "int-size-is-shortest-edge": {"size": 27},
    "max-height-width": {"size": {"max_height": 40, "max_width": 32}, "image_mean": [0.1, 0.2, 0.3]},
    "shortest-longest-edge": {"size": {"shortest_edge": 30, "longest_edge": 45}},
}
CASES = [("CLIPImageProcessor", ClipImageProcessor, name, cfg) for name, cfg in CLIP_CONFIGS.items()] + [
    ("SiglipImageProcessor", SiglipImageProcessor, name, cfg) for name, cfg in SIGLIP_CONFIGS.items()
]


def _expected(theirs, img) -> torch.Tensor:
    return torch.as_tensor(np.asarray(theirs(img, return_tensors="np")["pixel_values"][0]), dtype=torch.float32)


def _rgb_only(cfg: dict, mode: str) -> bool:
    # Without do_convert_rgb transformers keeps 1 or 4 channels the towers cannot take; cultengine converts.
    return cfg.get("do_convert_rgb", True) is not False or mode == "RGB"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("hf_name", "ours_cls", "name", "cfg"), CASES, ids=[f"{c[0][:4]}-{c[2]}" for c in CASES])
def test_pixels_match_transformers(hf_name, ours_cls, name, cfg, backend):
    ours, theirs = ours_cls(cfg, backend=backend), hf_processor(hf_name, backend, **cfg)
    assert ours.backend == backend
    for i, (w, h, mode) in enumerate(IMAGES):
        if not _rgb_only(cfg, mode):
            continue
        img = _image(w, h, mode, seed=i)
        try:
            expected = _expected(theirs, img)
        except (ValueError, RuntimeError):  # a 211x2 image fitted into 32x40 is 0 pixels high: both refuse it
            with pytest.raises(ValueError, match="would resize to"):
                ours(img)
            continue
        got = ours(img)
        assert got.dtype == torch.float32 and got.shape == expected.shape, (name, w, h, mode, got.shape)
        assert (got - expected).abs().max().item() <= PIXEL_TOL, (name, w, h, mode)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_image_at_a_time_matches_transformers_batches(backend):
    """transformers resizes same-shape images as one stacked batch; cultengine one by one, to the same pixels."""
    cfg = CLIP_CONFIGS["llava-bicubic"]
    images = [_image(97, 61, "RGB", s) for s in range(3)] + [_image(61, 97, "RGBA", 3)]
    batch = hf_processor("CLIPImageProcessor", backend, **cfg)(images, return_tensors="pt")["pixel_values"]
    ours = ClipImageProcessor(cfg, backend=backend)
    assert torch.equal(torch.stack(ours.preprocess(images)), batch)


def test_the_two_paths_really_differ():
    """Downscaling is where PIL and torchvision part ways; a single implementation cannot match both."""
    cfg = CLIP_CONFIGS["llava-bicubic"]
    img = _image(301, 199, "RGB", seed=2)
    pil, tv = (ClipImageProcessor(cfg, backend=b)(img) for b in BACKENDS)
    assert (pil - tv).abs().max().item() > 1e-3
    for backend, px in zip(BACKENDS, (pil, tv), strict=True):
        other = _expected(
            hf_processor("CLIPImageProcessor", "pil" if backend == "torchvision" else "torchvision", **cfg), img
        )
        assert (px - other).abs().max().item() > 1e-3


def test_step_functions_agree_where_transformers_does():
    """Exact steps (pad, pad to square, in-bounds crop) give the same uint8 pixels on both paths."""
    img = _image(23, 14, "RGB", seed=5)
    pil, tv = (to_channels_first(img, b) for b in BACKENDS)
    assert isinstance(pil, np.ndarray) and isinstance(tv, torch.Tensor)
    np.testing.assert_array_equal(pil, tv.numpy())
    for step in (
        lambda x: pad_to_square(x, (122, 116, 104)),
        lambda x: pad(x, (20, 30), fill=7),
        lambda x: center_crop(x, (10, 9)),
        lambda x: pad_to_square(x, 255),
    ):
        np.testing.assert_array_equal(step(pil), step(tv).numpy())
    assert pad_to_square(pil, 255).shape == (3, 23, 23) and pad_to_square(pil, 255)[1:, 0].max() == 0
    assert fit_within_size((100, 200), 50, 50) == (25, 50) and fit_within_size((100, 200), 200, 500) == (200, 400)
    assert resize_output_size({"height": 7, "width": 9}, (100, 3)) == (7, 9)
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        center_crop([[1]], (1, 1))


# -- which path ---------------------------------------------------------------------------------------------

PICK_CONFIGS = {
    "clip": {"image_processor_type": "CLIPImageProcessor"},
    "clip-fast-suffix": {"image_processor_type": "CLIPImageProcessorFast"},
    "clip-use-fast-false": {"image_processor_type": "CLIPImageProcessor", "use_fast": False},
    "clip-fast-use-fast-false": {"image_processor_type": "CLIPImageProcessorFast", "use_fast": False},
    "clip-pil-type": {"image_processor_type": "CLIPImageProcessorPil"},
    "siglip": {"image_processor_type": "SiglipImageProcessor"},
    "idefics3-lanczos": {"image_processor_type": "Idefics3ImageProcessor"},
    "smolvlm-fast-lanczos": {"image_processor_type": "SmolVLMImageProcessorFast"},
    "no-type (from config.json)": {},
    "no-type-use-fast-true": {"use_fast": True},
}


@pytest.fixture(scope="module")
def saved_configs(tiny_llama, tmp_path_factory):
    """One checkpoint-like directory (config.json + preprocessor_config.json) per variant."""
    base = json.loads((tiny_llama / "preprocessor_config.json").read_text())
    base.pop("image_processor_type", None)
    out = {}
    for name, extra in PICK_CONFIGS.items():
        d = tmp_path_factory.mktemp("pick")
        shutil.copy(tiny_llama / "config.json", d / "config.json")
        cfg = {**base, **extra}
        (d / "preprocessor_config.json").write_text(json.dumps(cfg))
        out[name] = (d, cfg)
    return out


@pytest.mark.parametrize("name", list(PICK_CONFIGS))
def test_default_backend_is_what_auto_image_processor_picks(name, saved_configs):
    d, cfg = saved_configs[name]
    assert resolve_image_backend(cfg, None) == transformers.AutoImageProcessor.from_pretrained(d).backend
    for use_fast, requested in ((True, "torchvision"), (False, "pil")):
        theirs = transformers.AutoImageProcessor.from_pretrained(d, use_fast=use_fast).backend
        assert resolve_image_backend(cfg, requested) == theirs


def test_without_torchvision_both_pick_pil(saved_configs, monkeypatch):
    import transformers.models.auto.image_processing_auto as auto

    monkeypatch.setattr(auto, "is_torchvision_available", lambda: False)
    monkeypatch.setattr(ce_image, "torchvision_available", lambda: False)
    for d, cfg in saved_configs.values():
        assert resolve_image_backend(cfg, None) == "pil" == transformers.AutoImageProcessor.from_pretrained(d).backend
    assert ClipImageProcessor({}).backend == "pil"
    with pytest.raises(ImportError, match="needs torchvision, which is not installed"):
        ClipImageProcessor({}, backend="torchvision")


def test_lanczos_processors_stay_on_pil_before_torchvision_0_27(saved_configs, monkeypatch):
    import transformers.models.auto.image_processing_auto as auto

    monkeypatch.setattr(auto, "DEFAULT_TO_PIL_BACKEND_IMAGE_PROCESSORS", auto._LANCZOS_IMAGE_PROCESSORS)
    real_version = ce_image._version
    monkeypatch.setattr(ce_image, "_version", lambda p: "0.26.0" if p == "torchvision" else real_version(p))
    picks = {}
    for name, (d, cfg) in saved_configs.items():
        picks[name] = resolve_image_backend(cfg, None)
        assert picks[name] == transformers.AutoImageProcessor.from_pretrained(d).backend, name
    assert picks["idefics3-lanczos"] == picks["smolvlm-fast-lanczos"] == "pil" and picks["clip"] == "torchvision"


def test_transformers_4_rules(monkeypatch):
    """transformers 4.5x (read from its AutoImageProcessor, not installed here): the saved class decides."""
    real_version = ce_image._version
    monkeypatch.setattr(ce_image, "_version", lambda p: "4.57.1" if p == "transformers" else real_version(p))
    picks = {
        t: resolve_image_backend({"image_processor_type": t})
        for t in ("CLIPImageProcessor", "CLIPImageProcessorFast", "Qwen2VLImageProcessor", "")
    }
    assert picks == {
        "CLIPImageProcessor": "pil",
        "CLIPImageProcessorFast": "torchvision",
        "Qwen2VLImageProcessor": "torchvision",
        "": "pil",
    }
    monkeypatch.setattr(ce_image, "torchvision_available", lambda: False)
    assert resolve_image_backend({"image_processor_type": "CLIPImageProcessorFast"}) == "pil"


def test_processor_for_checkpoint_follows_image_processor_type():
    siglip = image_processor_for_checkpoint({"image_processor_type": "SiglipImageProcessorFast"}, 30, "pil")
    assert type(siglip) is SiglipImageProcessor and siglip.backend == "pil"
    assert type(image_processor_for_checkpoint({}, 30, "torchvision")) is ClipImageProcessor
    # No preprocessor_config.json: the tower's image size, resized exactly (SigLIP) or resized + cropped (CLIP).
    img = _image(50, 31, "RGB", 0)
    assert SiglipImageProcessor.for_config({}, 30)(img).shape == (3, 30, 30)
    assert ClipImageProcessor.for_config({}, 30)(img).shape == (3, 30, 30)
    with pytest.raises(ValueError, match="'BlipImageProcessor' is not implemented"):
        image_processor_for_checkpoint({"image_processor_type": "BlipImageProcessor"}, 30)


def test_backend_errors_and_provenance(tiny_llama):
    with pytest.raises(ValueError, match="unknown image backend 'tensorflow'"):
        resolve_image_backend({}, "tensorflow")
    proc = ClipImageProcessor.from_pretrained(tiny_llama, backend="pil")
    record = proc.provenance()
    assert record["image_backend"] == "pil" and record["image_processor"] == "ClipImageProcessor"
    assert record["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert record["versions"]["torchvision"] is not None and record["versions"]["transformers"] is not None


# -- end to end ----------------------------------------------------------------------------------------------

E2E_IMAGES = [_image(97, 61, "RGB", 11), _image(50, 83, "RGBA", 12), _image(40, 30, "RGB", 13)]
E2E_REQUESTS = [
    {"prompt": f"{IMAGE_TOKEN}\nWhich country is this dish from?", "images": [E2E_IMAGES[0]]},
    {"prompt": f"{IMAGE_TOKEN} and {IMAGE_TOKEN}: compare the two flags.", "images": E2E_IMAGES[1:]},
]
CHOICES = ["Japan", " Peru", "Ghana and more"]


@pytest.fixture(scope="module")
def reference(tiny_llama):
    model = reference_model(tiny_llama)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_llama)
    cfg = model.config
    per_image = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 + (
        cfg.vision_feature_select_strategy == "full"
    )

    def encode(prompt: str) -> list[int]:
        ids = []
        for t in tok(prompt)["input_ids"]:
            ids += [t] * (per_image if t == cfg.image_token_id else 1)
        return ids

    return model, tok, encode


def _continuation_logprobs(model, ids: list[int], cont: list[int], pixels) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([ids + cont]), pixel_values=pixels).logits[0]
    return torch.log_softmax(logits, -1)[len(ids) - 1 : -1].gather(1, torch.tensor(cont)[:, None]).squeeze(1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_matches_transformers_on_each_path(backend, reference, tiny_llama):
    model, tok, encode = reference
    engine = Engine(tiny_llama, dtype="float32", image_backend=backend)
    assert engine.provenance()["image_backend"] == backend
    config = json.loads((tiny_llama / "preprocessor_config.json").read_text())
    theirs = hf_processor("CLIPImageProcessor", backend, **config)
    outs = engine.generate(E2E_REQUESTS, SamplingParams(max_tokens=8), use_tqdm=False)
    scores = engine.score([{**r, "choices": CHOICES} for r in E2E_REQUESTS], use_tqdm=False)
    with torch.no_grad():
        for req, out, score in zip(E2E_REQUESTS, outs, scores, strict=True):
            ids, pixels = encode(req["prompt"]), theirs(req["images"], return_tensors="pt")["pixel_values"]
            assert out.error is None and score.error is None and out.prompt_token_ids == ids
            input_ids = torch.tensor([ids])
            want = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=8,
                do_sample=False,
                pixel_values=pixels,
            )[0, len(ids) :].tolist()
            assert out.token_ids == want
            per_token = _continuation_logprobs(model, ids, want, pixels)
            np.testing.assert_allclose(out.logprobs, per_token.numpy(), atol=LOGPROB_TOL)
            for choice, got in zip(CHOICES, score.choices, strict=True):
                cont = tok(choice, add_special_tokens=False)["input_ids"]
                want_lp = float(_continuation_logprobs(model, ids, cont, pixels).sum())
                assert got.logprob == pytest.approx(want_lp, abs=LOGPROB_TOL)
