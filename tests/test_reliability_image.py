"""Images are bounded before they are decoded: size and aspect-ratio limits, PIL's bomb check, bad types."""

import struct
import time
import warnings
import zlib

import pytest
from PIL import Image

from cultengine import image, image_files
from cultengine.image_files import load_image


def png_header(width: int, height: int) -> bytes:
    """A PNG declaring width x height 8-bit greyscale pixels, with one empty IDAT: a few dozen bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_extreme_aspect_ratio_is_refused_before_decoding(tmp_path):
    f = tmp_path / "strip.png"
    Image.new("L", (1, 60000)).save(f)
    assert f.stat().st_size < 2000
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"strip.png is 1x60000, an aspect ratio over the limit of 200:1"):
        load_image(f)
    assert time.perf_counter() - t0 < 1.0
    assert load_image(f, max_aspect_ratio=60000).size == (1, 60000)  # the limit is configurable


def test_pixel_limit_is_checked_from_the_header(monkeypatch):
    # 60000 x 60000 declared; decoding would need 3.6 GB. The header alone refuses it (PIL's own check).
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(png_header(60000, 60000))
    # Under PIL's threshold but over ours: refused before `.load()` would try to inflate the data.
    with pytest.raises(ValueError, match=r"8000x8001 = 64,008,000 pixels, over the limit of 64,000,000"):
        load_image(png_header(8000, 8001))
    monkeypatch.setattr(image_files, "MAX_IMAGE_PIXELS", 100)  # the module limit applies to every caller
    with pytest.raises(ValueError, match="over the limit of 100"):
        load_image(Image.new("RGB", (11, 10)))
    assert load_image(Image.new("RGB", (10, 10))).size == (10, 10)


def test_decompression_bomb_warning_as_error_is_a_value_error():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="decompression bomb"):
            load_image(png_header(10000, 10000), max_pixels=10**9)


@pytest.mark.parametrize("src", [123, None, 1.5, ["a.png"], {"path": "a.png"}])
def test_unsupported_image_types_are_value_errors(src):
    with pytest.raises(ValueError, match="unsupported image"):
        load_image(src)


def test_truncated_images_fail_even_when_another_library_allows_them(monkeypatch, tmp_path):
    """lmms-eval sets PIL's global LOAD_TRUNCATED_IMAGES; the engine's images still decode strictly."""
    import io

    from PIL import Image, ImageFile

    from cultengine.image_files import load_image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, format="PNG")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(buf.getvalue()[:80])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the other library's setting is left as it was


# ------------------------------------------------------------------------------------------------
# Resizing, cropping and padding are bounded too: a small image cannot be blown up past the limit.
def test_a_config_resizing_a_small_image_to_gigabytes_is_refused_before_allocating():
    from cultengine.image import ClipImageProcessor

    proc = ClipImageProcessor({"size": {"shortest_edge": 60000}, "crop_size": 224, "do_center_crop": False})
    with pytest.raises(ValueError, match=r"would resize a 40x30 image to 80000x60000 = 4,800,000,000 pixels"):
        proc(Image.new("RGB", (40, 30)))
    crop = ClipImageProcessor({"size": {"shortest_edge": 30}, "do_center_crop": True, "crop_size": 70000})
    with pytest.raises(ValueError, match="would pad \\(to crop\\)"):
        crop(Image.new("RGB", (40, 30)))


@pytest.mark.parametrize("config, request_min", [({"min_pixels": 10**9}, None), ({}, 2 * 10**8)])
def test_qwen_min_pixels_from_the_config_or_a_request_are_bounded(config, request_min):
    from cultengine.models.qwen2_vl import QwenImageProcessor

    proc = QwenImageProcessor({**config, "max_pixels": max(10**10, config.get("min_pixels", 0))})
    with pytest.raises(ValueError, match="over the limit of 16,777,216 .*min_pixels"):
        proc.process(Image.new("RGB", (40, 30)), min_pixels=request_min)


def test_padding_to_a_square_is_bounded(monkeypatch):
    monkeypatch.setattr(image, "MAX_RESIZED_PIXELS", 100)
    x = image.to_channels_first(Image.new("RGB", (20, 2)), "pil")
    with pytest.raises(ValueError, match="would pad \\(to a square\\) a 20x2 image to 20x20"):
        image.pad_to_square(x)
    assert image.pad_to_square(image.to_channels_first(Image.new("RGB", (10, 2)), "pil")).shape == (3, 10, 10)
