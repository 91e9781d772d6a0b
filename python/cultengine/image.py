"""Image preprocessing, numerically equal to transformers' image processors on both of its paths (reading the
images themselves, with their size limits, is `image_files.py`).

transformers 5 builds every image processor on one of two backends: "pil" (PIL resize on uint8 pixels, numpy
arithmetic) and "torchvision" (uint8 tensors resized by `torchvision.transforms.v2.functional`, fused
rescale-and-normalise in float32). Their outputs differ by up to a few hundredths per pixel, so cultengine
implements both and follows transformers' own choice by default (`resolve_image_backend`).

The steps are public functions, one per step, that later families (tiling, smart resize) compose. An image
travels through them channels-first, as a `numpy.ndarray` on the "pil" path and a `torch.Tensor` on the
"torchvision" path: the array type carries the backend, so each step dispatches on it and the two can never
be mixed. Geometric steps take uint8 pixels; `rescale_and_normalize` turns them into float32.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
from collections.abc import Sequence
from math import ceil
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from PIL import Image

from .image_files import ImageInput, load_image, to_rgb

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Pixels an image may have after resizing, cropping or padding (4096x4096, above every supported model's
# input: Qwen2-VL's default max_pixels is 1M). A config's `shortest_edge: 60000` or a request's
# `min_pixels: 2e8` would otherwise turn a 40x30 image into gigabytes; checked before allocating.
MAX_RESIZED_PIXELS = 4096 * 4096


def content_hash(pixels: torch.Tensor) -> int:
    """u64 identity of a preprocessed image (blake2b of shape + pixel bytes) for the prefix/vision caches."""
    arr = np.ascontiguousarray(pixels.detach().to("cpu", torch.float32).numpy())
    h = hashlib.blake2b(digest_size=8)
    h.update(np.asarray(arr.shape, dtype=np.int64).tobytes())
    h.update(arr.tobytes())
    return int.from_bytes(h.digest(), "little")


# ----------------------------------------------------------------------------------------------------------
# Which path: transformers' rules

Backend = Literal["pil", "torchvision"]
BACKENDS: tuple[Backend, ...] = ("pil", "torchvision")
Array = np.ndarray | torch.Tensor  # a channels-first image: numpy on the "pil" path, torch on "torchvision"

IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

# transformers 5 keeps these on PIL while torchvision (< 0.27) has no Lanczos resize.
_LANCZOS_PROCESSORS = (
    "ChameleonImageProcessor",
    "FlavaImageProcessor",
    "Idefics3ImageProcessor",
    "SmolVLMImageProcessor",
)
# transformers 4.5x loads these on torchvision even when the checkpoint saved the PIL class.
_FORCE_FAST_PROCESSORS_V4 = ("Qwen2VLImageProcessor",)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def torchvision_available() -> bool:
    """Whether torchvision can be imported (what transformers checks before building a torchvision processor)."""
    return importlib.util.find_spec("torchvision") is not None


def resolve_image_backend(preprocessor_config: dict | None, requested: str | None = None) -> Backend:
    """The preprocessing path: `requested` if given, else the one transformers' `AutoImageProcessor` would pick.

    transformers 5 (and the default when transformers is absent): torchvision whenever it is installed, PIL
    otherwise (Lanczos processors stay on PIL with torchvision < 0.27); neither the `Fast` suffix of
    `image_processor_type` nor a `use_fast` key in the config changes that, only `use_fast=`/`backend=` passed
    to `from_pretrained`, which is `requested` here. transformers 4: torchvision only when the checkpoint saved
    a `...Fast` processor (or Qwen2-VL's) and torchvision is installed.
    Asking for "torchvision" without it installed is an error here (transformers would fall back silently).
    """
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"unknown image backend {requested!r}: choose one of {', '.join(BACKENDS)}")
        if requested == "torchvision" and not torchvision_available():
            raise ImportError(
                f"image backend 'torchvision' needs torchvision, which is not installed: install the release "
                f"built for torch {torch.__version__.split('+')[0]} (`pip install torchvision`, without "
                f"replacing torch), or use image backend 'pil'"
            )
        return requested
    if not torchvision_available():
        return "pil"
    kind = str((preprocessor_config or {}).get("image_processor_type") or "")
    transformers_version = _version("transformers")
    if transformers_version is not None and _major_minor(transformers_version)[0] < 5:
        return "torchvision" if kind.endswith("Fast") or kind in _FORCE_FAST_PROCESSORS_V4 else "pil"
    if kind.removesuffix("Fast") in _LANCZOS_PROCESSORS and _major_minor(_version("torchvision") or "0.0") < (0, 27):
        return "pil"
    return "torchvision"


def _tvF():
    """torchvision.transforms.v2.functional, imported on first use: torchvision is optional."""
    try:
        from torchvision.transforms.v2 import functional
    except ImportError as e:
        raise ImportError("the torchvision image path needs torchvision, which is not installed") from e
    return functional


def _is_pil_path(x: Array) -> bool:
    if isinstance(x, np.ndarray):
        return True
    if isinstance(x, torch.Tensor):
        return False
    raise TypeError(f"expected a channels-first numpy array or torch tensor, got {type(x).__name__}")


# ----------------------------------------------------------------------------------------------------------
# Output sizes (integer arithmetic shared by both paths, rounded exactly as transformers)


def size_dict(size: Any, default_to_square: bool) -> dict[str, int]:
    """A config's `size`/`crop_size` as transformers' size dict: an int is a square when `default_to_square`,
    else the shortest edge; a pair is (height, width)."""
    if isinstance(size, dict):
        keys = set(size)
        valid = (
            {"height", "width"},
            {"shortest_edge"},
            {"shortest_edge", "longest_edge"},
            {"longest_edge"},
            {"max_height", "max_width"},
            {"min_pixels", "max_pixels"},
        )
        if keys not in valid:
            raise ValueError(f"size must have one of the key sets {[sorted(k) for k in valid]}, got {sorted(keys)}")
        return {k: int(v) for k, v in size.items()}
    if isinstance(size, int):
        return {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    raise ValueError(f"cannot read image size {size!r}")


def shortest_edge_size(hw: tuple[int, int], shortest_edge: int) -> tuple[int, int]:
    """Scale so the shorter side is `shortest_edge`; the longer side is truncated (transformers/torchvision)."""
    h, w = hw
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if w <= h else (shortest_edge, new_long)


def shortest_longest_edge_size(hw: tuple[int, int], shortest_edge: int, longest_edge: int) -> tuple[int, int]:
    """Shorter side `shortest_edge` unless that makes the longer side exceed `longest_edge` (DETR-style)."""
    h, w = hw
    size, raw = shortest_edge, None
    lo, hi = float(min(h, w)), float(max(h, w))
    if hi / lo * size > longest_edge:
        raw = longest_edge * lo / hi
        size = int(round(raw))
    if (h <= w and h == size) or (w <= h and w == size):
        return h, w
    if w < h:
        return int((raw if raw is not None else size) * h / w), size
    return size, int((raw if raw is not None else size) * w / h)


def fit_within_size(hw: tuple[int, int], max_height: int, max_width: int) -> tuple[int, int]:
    """Scale (up or down) to the largest size inside `max_height` x `max_width`, keeping the aspect ratio
    (transformers' `get_image_size_for_max_height_width`). `fit_within_size(hw, n, n)` resizes the longest
    edge to `n`."""
    h, w = hw
    scale = min(max_height / h, max_width / w)
    return int(h * scale), int(w * scale)


def resize_output_size(size: dict[str, int], hw: tuple[int, int]) -> tuple[int, int]:
    """(height, width) after transformers' standard resize for a size dict, in its order of precedence."""
    if "shortest_edge" in size and "longest_edge" in size:
        return shortest_longest_edge_size(hw, size["shortest_edge"], size["longest_edge"])
    if "shortest_edge" in size:
        return shortest_edge_size(hw, size["shortest_edge"])
    if "max_height" in size and "max_width" in size:
        return fit_within_size(hw, size["max_height"], size["max_width"])
    if "height" in size and "width" in size:
        return size["height"], size["width"]
    raise ValueError(f"size must hold height+width, max_height+max_width or shortest_edge, got {size}")


# ----------------------------------------------------------------------------------------------------------
# The steps, each once per path


def to_channels_first(image: Image.Image, backend: Backend, convert_rgb: bool = True) -> Array:
    """A PIL image as uint8 [3, H, W] pixels on `backend` (numpy for "pil", a torch tensor for "torchvision").

    `convert_rgb` is transformers' `do_convert_rgb`: transparency is composited onto white (which also turns an
    RGB image with a transparent colour white there). An image that is not RGB is converted regardless, as
    the vision towers take three channels. Both paths convert with PIL, as transformers does for PIL inputs.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown image backend {backend!r}")
    rgb = to_rgb(image) if convert_rgb or image.mode != "RGB" else image
    hwc = np.array(rgb)
    if backend == "pil":
        return hwc.transpose(2, 0, 1)
    return torch.from_numpy(hwc).permute(2, 0, 1).contiguous()


def _tv_interpolation(resample: int):
    tvF = _tvF()
    modes = {
        0: tvF.InterpolationMode.NEAREST_EXACT,
        1: tvF.InterpolationMode.LANCZOS,
        2: tvF.InterpolationMode.BILINEAR,
        3: tvF.InterpolationMode.BICUBIC,
        4: tvF.InterpolationMode.BOX,
        5: tvF.InterpolationMode.HAMMING,
    }  # transformers' pil_torch_interpolation_mapping
    mode = modes[int(resample)]
    if mode == tvF.InterpolationMode.LANCZOS and _major_minor(_version("torchvision") or "0.0") < (0, 27):
        mode = tvF.InterpolationMode.BICUBIC  # transformers' fallback: no Lanczos before torchvision 0.27
    return mode


def check_output_size(x: Array, hw: tuple[int, int], step: str) -> None:
    """Refuse making an image of (height, width) `hw` from `x` past `MAX_RESIZED_PIXELS`, before allocating."""
    h, w = hw
    if h * w > MAX_RESIZED_PIXELS:
        raise ValueError(
            f"the image processor would {step} a {x.shape[-1]}x{x.shape[-2]} image to {w}x{h} = {h * w:,} pixels, "
            f"over the limit of {MAX_RESIZED_PIXELS:,} (cultengine.image.MAX_RESIZED_PIXELS); check the "
            "processor config's size or the request's min_pixels"
        )


def resize(x: Array, hw: tuple[int, int], resample: int) -> Array:
    """Resize uint8 pixels to exactly (height, width) with a PIL resample filter (0 nearest, 1 Lanczos,
    2 bilinear, 3 bicubic, ...): PIL's own filter on "pil"; on "torchvision" the mapped interpolation with
    antialiasing, as transformers' fast processors."""
    h, w = hw
    if h < 1 or w < 1:
        raise ValueError(f"a {x.shape[-1]}x{x.shape[-2]} image would resize to {w}x{h}")
    check_output_size(x, hw, "resize")
    if _is_pil_path(x):
        if x.dtype != np.uint8:
            raise TypeError(f"resize takes uint8 pixels, got {x.dtype}")
        hwc = np.ascontiguousarray(x.transpose(1, 2, 0))
        img = Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)
        out = np.array(img.resize((w, h), resample=Image.Resampling(int(resample))))
        return (out[..., None] if out.ndim == 2 else out).transpose(2, 0, 1)
    return _tvF().resize(x, [h, w], interpolation=_tv_interpolation(resample), antialias=True)


def center_crop(x: Array, hw: tuple[int, int]) -> Array:
    """Crop the centre (height, width); an image smaller than the crop is zero-padded first. The two paths
    place an odd padding differently (PIL: the extra pixel before, torchvision: after), as in transformers."""
    ch, cw = hw
    pil_path, (h, w) = _is_pil_path(x), x.shape[-2:]
    check_output_size(x, (max(ch, h), max(cw, w)), "pad (to crop)")
    if pil_path:
        top, left = (h - ch) // 2, (w - cw) // 2
        if top >= 0 and left >= 0:
            return x[..., top : top + ch, left : left + cw]
        nh, nw = max(ch, h), max(cw, w)
        padded = np.zeros(x.shape[:-2] + (nh, nw), dtype=x.dtype)
        tp, lp = ceil((nh - h) / 2), ceil((nw - w) / 2)
        padded[..., tp : tp + h, lp : lp + w] = x
        top, left = top + tp, left + lp
        return padded[..., max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]
    tvF = _tvF()
    if cw > w or ch > h:
        ltrb = [max(cw - w, 0) // 2, max(ch - h, 0) // 2, max(cw - w + 1, 0) // 2, max(ch - h + 1, 0) // 2]
        x = tvF.pad(x, ltrb, fill=0)
        h, w = x.shape[-2:]
        if (h, w) == (ch, cw):
            return x
    return tvF.crop(x, int((h - ch) / 2.0), int((w - cw) / 2.0), ch, cw)


def pad(x: Array, hw: tuple[int, int], fill: float = 0) -> Array:
    """Pad on the bottom and right to (height, width) with `fill` (transformers' `do_pad` with `pad_size`)."""
    h, w = x.shape[-2:]
    ph, pw = hw[0] - h, hw[1] - w
    if ph < 0 or pw < 0:
        raise ValueError(f"cannot pad a {h}x{w} image to {hw[0]}x{hw[1]}")
    check_output_size(x, hw, "pad")
    if _is_pil_path(x):
        return np.pad(x, ((0, 0), (0, ph), (0, pw)), mode="constant", constant_values=fill)
    return torch.nn.functional.pad(x, (0, pw, 0, ph), value=fill)


def pad_centered(x: Array, hw: tuple[int, int]) -> Array:
    """Zero-pad to (height, width) around the centre, the odd pixel after (LLaVA-NeXT's patching pad).
    Exact on both paths."""
    c, h, w = x.shape
    top, left = (hw[0] - h) // 2, (hw[1] - w) // 2
    if top < 0 or left < 0:
        raise ValueError(f"cannot pad a {h}x{w} image to {hw[0]}x{hw[1]}")
    check_output_size(x, hw, "pad")
    out = np.zeros((c, *hw), dtype=x.dtype) if _is_pil_path(x) else x.new_zeros((c, *hw))
    out[:, top : top + h, left : left + w] = x
    return out


def pad_to_square(x: Array, background: int | Sequence[int] = 0) -> Array:
    """Centre the image on a square of its longest side filled with `background` (one value per channel; an
    int fills the first channel only, as transformers' LLaVA processors). Exact on both paths."""
    c, h, w = x.shape
    if h == w:
        return x
    color = [background] + [0] * (c - 1) if isinstance(background, int) else list(background)
    if len(color) != c:
        raise ValueError(f"background needs {c} values, got {len(color)}")
    side = max(h, w)
    check_output_size(x, (side, side), "pad (to a square)")
    top, left = (side - h) // 2, (side - w) // 2
    if _is_pil_path(x):
        out = np.empty((c, side, side), dtype=x.dtype)
        out[:] = np.asarray(color, dtype=x.dtype)[:, None, None]
    else:
        out = torch.tensor(color, dtype=x.dtype).view(c, 1, 1).repeat(1, side, side)
    out[:, top : top + h, left : left + w] = x
    return out


def rescale_and_normalize(
    x: Array, rescale_factor: float | None, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> Array:
    """float32 pixels `(x * rescale_factor - mean) / std`, either part optional (None), with each path's
    arithmetic: "pil" rescales in float64, casts to float32 and normalises in float32; "torchvision" fuses
    both into one float32 normalise by `mean / rescale_factor` and `std / rescale_factor`."""
    normalize = mean is not None and std is not None
    if _is_pil_path(x):
        y = (x.astype(np.float64) * rescale_factor).astype(np.float32) if rescale_factor is not None else x
        y = y.astype(np.float32, copy=False)
        if normalize:
            y = ((y.T - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)).T
        return y
    tvF = _tvF()
    if normalize and rescale_factor is not None:
        mean_t = torch.tensor(tuple(mean)) * (1.0 / rescale_factor)
        std_t = torch.tensor(tuple(std)) * (1.0 / rescale_factor)
        return tvF.normalize(x.to(torch.float32), mean_t, std_t)
    if normalize:
        return tvF.normalize(x.to(torch.float32), tuple(mean), tuple(std))
    if rescale_factor is not None:
        return x * rescale_factor
    return x.to(torch.float32)


def to_tensor(x: Array) -> torch.Tensor:
    """The finished image as a contiguous float32 torch tensor, whichever path produced it."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if _is_pil_path(x) else x.contiguous()
    return t.to(torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Processors


def _per_channel(value: float | Sequence[float], name: str) -> tuple[float, ...]:
    # transformers accepts one mean/std for all three channels; a list of another length would broadcast
    # (one element) or fail on the first image, so it is refused here.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * 3
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    ):
        raise ValueError(f"preprocessor_config.json: {name} must be a number or three (R, G, B), got {value!r}")
    return tuple(float(v) for v in value)


class ImageProcessor:
    """preprocessor_config.json -> `[3, H, W]` float32 pixel tensors, as transformers' processor of the same
    name on the same path (`backend`).

    Subclasses set transformers' class defaults (`DEFAULTS`, used where the config omits a key or sets it to
    null) and may replace `geometry` (the uint8 resize/crop stage) for tiling or smart-resize families.
    """

    DEFAULTS: ClassVar[dict[str, Any]] = {}
    DEFAULT_TO_SQUARE: ClassVar[bool] = False  # how an int `size` reads: square, or shortest edge

    def __init__(self, config: dict | None = None, backend: str | None = None):
        self.backend: Backend = resolve_image_backend(config, backend)
        c = {**self.DEFAULTS, **{k: v for k, v in (config or {}).items() if v is not None}}
        self.do_convert_rgb = bool(c.get("do_convert_rgb"))
        self.do_resize = bool(c.get("do_resize"))
        self.size = size_dict(c["size"], self.DEFAULT_TO_SQUARE) if self.do_resize else None
        self.resample = int(c.get("resample", Image.Resampling.BILINEAR))
        self.do_center_crop = bool(c.get("do_center_crop"))
        if self.do_center_crop and "crop_size" not in c:
            raise ValueError("preprocessor_config.json: do_center_crop needs crop_size")
        self.crop_size = size_dict(c["crop_size"], True) if self.do_center_crop else None
        self.rescale_factor = float(c.get("rescale_factor", 1 / 255)) if c.get("do_rescale") else None
        self.do_normalize = bool(c.get("do_normalize"))
        self.mean = _per_channel(c["image_mean"], "image_mean") if self.do_normalize else None
        self.std = _per_channel(c["image_std"], "image_std") if self.do_normalize else None
        pad_size = c.get("pad_size") if c.get("do_pad") else None
        self.pad_size = size_dict(pad_size, True) if pad_size is not None else None
        if self.do_resize:
            resize_output_size(self.size, (1, 1))  # an unsupported size fails here, not on the first image

    @classmethod
    def from_pretrained(cls, path: str | Path, backend: str | None = None) -> ImageProcessor:
        f = Path(path) / "preprocessor_config.json"
        return cls(json.loads(f.read_text()) if f.is_file() else None, backend=backend)

    @classmethod
    def for_config(cls, preprocessor_config: dict, image_size: int, backend: str | None = None) -> ImageProcessor:
        """A checkpoint's preprocessor_config.json; without one, inputs of the vision tower's `image_size`."""
        if preprocessor_config:
            return cls(preprocessor_config, backend=backend)
        return cls(cls.config_for_image_size(image_size), backend=backend)

    @classmethod
    def config_for_image_size(cls, size: int) -> dict:
        """The config that makes `size` x `size` inputs for a tower when a checkpoint has no preprocessor."""
        return {"size": {"height": size, "width": size}}

    def geometry(self, x: Array) -> Array:
        """The uint8 stage: resize (`size`), then centre crop (`crop_size`)."""
        if self.do_resize:
            x = resize(x, resize_output_size(self.size, tuple(x.shape[-2:])), self.resample)
        if self.do_center_crop:
            x = center_crop(x, (self.crop_size["height"], self.crop_size["width"]))
        return x

    def channels_first(self, image: ImageInput) -> Array:
        """The uint8 [3, H, W] pixels this processor's path starts from (tiling families split these)."""
        return to_channels_first(load_image(image), self.backend, convert_rgb=self.do_convert_rgb)

    def finish(self, x: Array) -> torch.Tensor:
        """The float stage after `geometry`: rescale, normalise, pad; a float32 tensor."""
        x = rescale_and_normalize(x, self.rescale_factor, self.mean, self.std)
        if self.pad_size is not None:
            x = pad(x, (self.pad_size["height"], self.pad_size["width"]))
        return to_tensor(x)

    def __call__(self, image: ImageInput) -> torch.Tensor:
        return self.finish(self.geometry(self.channels_first(image)))

    def preprocess(self, images: list[ImageInput]) -> list[torch.Tensor]:
        return [self(im) for im in images]

    def provenance(self) -> dict[str, Any]:
        """What produced the pixels: processor, path and library versions (for results files)."""
        from .provenance import library_versions

        return {"image_processor": type(self).__name__, "image_backend": self.backend, "versions": library_versions()}


class ClipImageProcessor(ImageProcessor):
    """transformers' `CLIPImageProcessor` (torchvision) / `CLIPImageProcessorPil`: shortest-edge resize,
    bicubic, centre crop, OpenAI CLIP mean and std."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": 224},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
    }

    @classmethod
    def config_for_image_size(cls, size: int) -> dict:
        return {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}


class SiglipImageProcessor(ImageProcessor):
    """transformers' `SiglipImageProcessor` (torchvision) / `SiglipImageProcessorPil`: resize to the exact
    size (no crop), bicubic by default as in transformers 5, mean and std 0.5."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": 224, "width": 224},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": IMAGENET_STANDARD_MEAN,
        "image_std": IMAGENET_STANDARD_STD,
    }


PROCESSORS: dict[str, type[ImageProcessor]] = {
    "CLIPImageProcessor": ClipImageProcessor,
    "SiglipImageProcessor": SiglipImageProcessor,
}


def image_processor_for_checkpoint(
    preprocessor_config: dict, image_size: int, backend: str | None = None
) -> ImageProcessor:
    """The processor named by a checkpoint's `image_processor_type` (CLIP when it names none); without a
    preprocessor_config.json, one that makes inputs of the tower's `image_size`."""
    kind = str(preprocessor_config.get("image_processor_type") or "CLIPImageProcessor")
    cls = PROCESSORS.get(kind.removesuffix("Fast").removesuffix("Pil"))
    if cls is None:
        raise ValueError(f"image processor {kind!r} is not implemented (known: {', '.join(PROCESSORS)})")
    return cls.for_config(preprocessor_config, image_size, backend=backend)
