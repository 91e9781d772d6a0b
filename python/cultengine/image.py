"""Image loading and CLIP preprocessing (numerically equal to transformers' PIL `CLIPImageProcessor`).

The steps and their float arithmetic follow transformers exactly: RGB conversion (transparency
composited onto white), shortest-edge resize in PIL on uint8 pixels, center crop (zero-padded when the
image is smaller than the crop), rescale in float64 then cast to float32, normalise in float32.
"""

from __future__ import annotations

import hashlib
import io
import json
from math import ceil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageInput = str | Path | bytes | bytearray | Image.Image


# Images are bounded before they are decoded: a few hundred bytes of PNG can declare a 1x60000 image that
# a shortest-edge resize turns into gigabytes, or billions of pixels. Set these to change the limits for
# every caller (the engine included), or pass `max_pixels` / `max_aspect_ratio` to `load_image`.
MAX_IMAGE_PIXELS = 64_000_000  # width x height; 8000x8000, above any phone camera's photo
MAX_ASPECT_RATIO = 200.0  # longer side / shorter side, as Qwen2-VL's processor allows


def check_image_size(size: tuple[int, int], name: str, max_pixels: int | None = None,
                     max_aspect_ratio: float | None = None) -> None:
    """Refuse an image of `size` (width, height) beyond the pixel or aspect-ratio limit."""
    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    max_aspect_ratio = MAX_ASPECT_RATIO if max_aspect_ratio is None else max_aspect_ratio
    w, h = size
    if w < 1 or h < 1:
        raise ValueError(f"image {name} has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ValueError(f"image {name} is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
                         "(cultengine.image.MAX_IMAGE_PIXELS)")
    if max(w, h) / min(w, h) > max_aspect_ratio:
        raise ValueError(f"image {name} is {w}x{h}, an aspect ratio over the limit of {max_aspect_ratio:g}:1 "
                         "(cultengine.image.MAX_ASPECT_RATIO)")


def load_image(src: ImageInput, max_pixels: int | None = None, max_aspect_ratio: float | None = None) -> Image.Image:
    """Open an image from a path, raw bytes or a PIL image; decode it fully so truncation fails here.

    The size is checked against `max_pixels` and `max_aspect_ratio` (default: the module's
    `MAX_IMAGE_PIXELS`, `MAX_ASPECT_RATIO`) from the header, before any pixel is decoded. Every
    failure, PIL's decompression-bomb check included, is a ValueError naming the image.
    """
    if isinstance(src, Image.Image):
        check_image_size(src.size, f"<PIL {src.mode} image>", max_pixels, max_aspect_ratio)
        return src
    if isinstance(src, (bytes, bytearray)):
        name, fp = f"<{len(src)} bytes>", io.BytesIO(src)
    elif isinstance(src, (str, Path)):
        p = Path(src).expanduser()
        if not p.is_file():
            raise ValueError(f"image file not found: {p}")
        name, fp = str(p), p
    else:
        raise ValueError(f"unsupported image {src!r:.80} of type {type(src).__name__} "
                         "(use a path, bytes or PIL.Image)")
    try:
        img = Image.open(fp)  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # the warning, under -W error
        raise ValueError(f"cannot read image {name}: refused as a decompression bomb: {e}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {name}: {e}") from e
    check_image_size(img.size, name, max_pixels, max_aspect_ratio)
    try:
        img.load()  # PIL decodes lazily: force it so a truncated file raises now, not mid-batch
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ValueError(f"cannot read image {name}: {e}") from e
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    # transformers 5 composites any transparency onto white before dropping alpha.
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def content_hash(pixels: torch.Tensor) -> int:
    """u64 identity of a preprocessed image (blake2b of shape + pixel bytes) for the prefix/vision caches."""
    arr = np.ascontiguousarray(pixels.detach().to("cpu", torch.float32).numpy())
    h = hashlib.blake2b(digest_size=8)
    h.update(np.asarray(arr.shape, dtype=np.int64).tobytes())
    h.update(arr.tobytes())
    return int.from_bytes(h.digest(), "little")


def _hw(size: Any) -> tuple[int, int] | None:
    if isinstance(size, int):
        return size, size
    if isinstance(size, dict) and "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    return None


class ClipImageProcessor:
    """preprocessor_config.json -> `[3, H, W]` float32 pixel tensors."""

    def __init__(self, config: dict | None = None):
        c = config or {}
        self.do_convert_rgb = c.get("do_convert_rgb", True) is not False
        self.do_resize = c.get("do_resize", True)
        size = c.get("size", {"shortest_edge": 224})
        # An int size means "shortest edge" for CLIP (default_to_square=False).
        self.shortest_edge = size if isinstance(size, int) else size.get("shortest_edge")
        self.resize_hw = None if self.shortest_edge is not None else _hw(size)
        if self.do_resize and self.shortest_edge is None and self.resize_hw is None:
            raise ValueError(f"preprocessor_config.json: unsupported size {size!r}")
        self.resample = Image.Resampling(int(c.get("resample", Image.Resampling.BICUBIC)))
        self.do_center_crop = c.get("do_center_crop", True)
        self.crop_hw = _hw(c.get("crop_size", {"height": 224, "width": 224}))
        self.do_rescale = c.get("do_rescale", True)
        self.rescale_factor = float(c.get("rescale_factor", 1 / 255))
        self.do_normalize = c.get("do_normalize", True)
        self.mean = np.asarray(c.get("image_mean", OPENAI_CLIP_MEAN), dtype=np.float32)
        self.std = np.asarray(c.get("image_std", OPENAI_CLIP_STD), dtype=np.float32)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ClipImageProcessor:
        f = Path(path) / "preprocessor_config.json"
        return cls(json.loads(f.read_text()) if f.is_file() else None)

    @classmethod
    def for_checkpoint(cls, ckpt) -> ClipImageProcessor:
        """The checkpoint's preprocessor_config.json; without one, resize + crop to the tower's image size."""
        if ckpt.preprocessor_config:
            return cls(ckpt.preprocessor_config)
        s = ckpt.vision.image_size
        return cls({"size": {"shortest_edge": s}, "crop_size": {"height": s, "width": s}})

    def _resize_to(self, h: int, w: int) -> tuple[int, int]:
        if self.shortest_edge is None:
            return self.resize_hw
        s = int(self.shortest_edge)
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(s * long / short)  # truncation, as transformers/torchvision
        return (new_long, s) if w <= h else (s, new_long)

    def __call__(self, image: ImageInput) -> torch.Tensor:
        img = load_image(image)
        img = to_rgb(img) if self.do_convert_rgb or img.mode != "RGB" else img
        if self.do_resize:
            h, w = self._resize_to(img.height, img.width)
            img = img.resize((w, h), resample=self.resample)
        x = np.asarray(img).transpose(2, 0, 1)  # uint8 [3, H, W]
        if self.do_center_crop:
            x = _center_crop(x, *self.crop_hw)
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            x = x.astype(np.float32)
        if self.do_normalize:
            x = ((x.T - self.mean) / self.std).T
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    def preprocess(self, images: list[ImageInput]) -> list[torch.Tensor]:
        return [self(im) for im in images]


def _center_crop(x: np.ndarray, ch: int, cw: int) -> np.ndarray:
    _, h, w = x.shape
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return x[:, top:top + ch, left:left + cw]
    # Smaller than the crop: zero-pad around the centre first (transformers does the same).
    nh, nw = max(ch, h), max(cw, w)
    padded = np.zeros((x.shape[0], nh, nw), dtype=x.dtype)
    tp, lp = ceil((nh - h) / 2), ceil((nw - w) / 2)
    padded[:, tp:tp + h, lp:lp + w] = x
    top, left = top + tp, left + lp
    return padded[:, max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]
