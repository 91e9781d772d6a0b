"""Reading images from untrusted inputs (paths, bytes, PIL images): the size and aspect ratio checked from the
header before anything is decoded, truncated files refused rather than half-read, FIFOs and devices refused,
transparency composited onto white as transformers does. What `image.py`'s preprocessing starts from.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

from PIL import Image, ImageFile, UnidentifiedImageError

from .paths import open_regular

ImageInput = str | Path | bytes | bytearray | Image.Image


# Images are bounded before they are decoded: a few hundred bytes of PNG can declare a 1x60000 image that
# a shortest-edge resize turns into gigabytes, or billions of pixels. Set these to change the limits for
# every caller (the engine included), or pass `max_pixels` / `max_aspect_ratio` to `load_image`.
MAX_IMAGE_PIXELS = 64_000_000  # width x height; 8000x8000, above any phone camera's photo
MAX_ASPECT_RATIO = 200.0  # longer side / shorter side, as Qwen2-VL's processor allows


def check_image_size(
    size: tuple[int, int], name: str, max_pixels: int | None = None, max_aspect_ratio: float | None = None
) -> None:
    """Refuse an image of `size` (width, height) beyond the pixel or aspect-ratio limit."""
    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    max_aspect_ratio = MAX_ASPECT_RATIO if max_aspect_ratio is None else max_aspect_ratio
    w, h = size
    if w < 1 or h < 1:
        raise ValueError(f"image {name} has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ValueError(
            f"image {name} is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
            "(cultengine.image_files.MAX_IMAGE_PIXELS)"
        )
    if max(w, h) / min(w, h) > max_aspect_ratio:
        raise ValueError(
            f"image {name} is {w}x{h}, an aspect ratio over the limit of {max_aspect_ratio:g}:1 "
            "(cultengine.image_files.MAX_ASPECT_RATIO)"
        )


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
        name, fp = str(p), open_regular(p, "image file")  # a FIFO or device: refused, never a blocked read
    else:
        raise ValueError(f"unsupported image {src!r:.80} of type {type(src).__name__} (use a path, bytes or PIL.Image)")
    with fp:
        return _open_checked(fp, name, max_pixels, max_aspect_ratio)


def _open_checked(fp, name: str, max_pixels: int | None, max_aspect_ratio: float | None) -> Image.Image:
    try:
        img = Image.open(fp)  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # the warning, under -W error
        raise ValueError(f"cannot read image {name}: refused as a decompression bomb: {e}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {name}: {e}") from e
    check_image_size(img.size, name, max_pixels, max_aspect_ratio)
    try:
        _decode(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ValueError(f"cannot read image {name}: {e}") from e
    return img


_STRICT = threading.Lock()


def _decode(img: Image.Image) -> None:
    """Decode now (PIL decodes lazily) so a truncated file raises here, not mid-batch, even where another
    library in the process (lmms-eval does) set PIL's global LOAD_TRUNCATED_IMAGES: then decoding is done
    with it cleared, one image at a time, and the library's setting put back."""
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        img.load()
        return
    with _STRICT:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            img.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = True


def to_rgb(img: Image.Image) -> Image.Image:
    # transformers 5 composites any transparency onto white before dropping alpha.
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")
