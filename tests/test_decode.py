"""Robust decoding: every readable image becomes RGB, unreadable ones raise ImageDecodeError."""

import io

import numpy as np
import pytest
from PIL import Image

from dinov2_hf.data import ImageDecodeError, open_rgb


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"), ("LA", "PNG"), ("RGB", "JPEG")])
def test_modes_become_rgb(mode, fmt, tmp_path):
    rng = np.random.RandomState(0)
    base = Image.fromarray((rng.rand(20, 30, 3) * 255).astype("uint8"))
    if mode == "I;16":
        image = Image.fromarray((rng.rand(20, 30) * 60000).astype("uint16"))
    else:
        image = base.convert(mode)
    data = encoded(image, fmt)
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(data)
    for source in (data, path):
        rgb = open_rgb(source)
        assert rgb.mode == "RGB" and rgb.size == (30, 20)
    if mode == "I;16":  # scaled to 8 bits, not clipped to white
        assert 50 < np.asarray(open_rgb(data)).mean() < 200


def test_transparent_pixels_composite_on_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert open_rgb(encoded(image, "PNG")).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("data, message", [(b"", "empty"), (b"not an image at all", "cannot decode")])
def test_bad_bytes(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        open_rgb(data)


def test_truncated_and_missing_files(tmp_path):
    data = encoded(Image.new("RGB", (64, 64), (10, 20, 30)), "JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="cannot decode"):
        open_rgb(truncated)
    with pytest.raises(ImageDecodeError, match="no such image file"):
        open_rgb(tmp_path / "missing.jpg")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty image file"):
        open_rgb(empty)
