"""Robust decoding: every readable image becomes RGB, unreadable ones raise ImageDecodeError."""

import io
import warnings

import numpy as np
import pytest
from bad_images import CORPUS, encoded, exif_rotated_jpeg, png_header, sixteen_bit
from PIL import Image

from dinov2_hf.data import MAX_IMAGE_PIXELS, ImageDecodeError, open_rgb


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


def test_exif_orientation_is_applied_as_transformers_load_image_does(tmp_path):
    from transformers.image_utils import load_image

    data = exif_rotated_jpeg()
    assert Image.open(io.BytesIO(data)).size == (64, 32)  # as stored
    path = tmp_path / "rotated.jpg"
    path.write_bytes(data)
    reference = np.asarray(load_image(str(path)), dtype=np.int16)
    for source in (data, path, Image.open(io.BytesIO(data))):
        image = open_rgb(source)
        assert image.size == (32, 64) and image.mode == "RGB"
        assert np.abs(np.asarray(image, dtype=np.int16) - reference).max() <= 2
    # rotated clockwise: the stored left (red) half is now the top
    assert open_rgb(data).getpixel((16, 8))[0] > 200 and open_rgb(data).getpixel((16, 56))[2] > 200


def test_pixel_limit_refuses_from_the_header_and_names_size_and_limit():
    data = encoded(Image.new("RGB", (16, 16), (1, 2, 3)), "PNG")
    with pytest.raises(ImageDecodeError, match=r"16x16 = 256 pixels, over the limit of 100"):
        open_rgb(data, max_pixels=100)
    assert open_rgb(data, max_pixels=256).size == (16, 16)
    # 10,000 x 10,000 with no pixel data: refused by the size alone, nothing is decoded
    with pytest.raises(ImageDecodeError, match=r"10000x10000 = 100,000,000 pixels, over the limit of 99,999,999"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            open_rgb(png_header(10_000, 10_000), max_pixels=99_999_999)
    with pytest.raises(ValueError, match="max_pixels must be a positive"):
        open_rgb(data, max_pixels=0)


def test_decompression_bombs_raise_image_decode_error_and_pil_limit_is_untouched():
    pil_limit = Image.MAX_IMAGE_PIXELS
    assert MAX_IMAGE_PIXELS >= pil_limit
    with pytest.raises(ImageDecodeError, match="20000x20000|too large"):
        open_rgb(png_header(20_000, 20_000))  # 400 Mpx: over our limit and PIL's own bomb threshold
    with pytest.raises(ImageDecodeError, match="too large"):
        open_rgb(png_header(20_000, 20_000), max_pixels=10**9)  # PIL's own error, not ours: still an ImageDecodeError
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning (over 89 Mpx) raised as an exception
        with pytest.raises(ImageDecodeError):
            open_rgb(png_header(10_000, 10_000))
    assert Image.MAX_IMAGE_PIXELS == pil_limit




@pytest.mark.parametrize("name, filename, data, size", CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_image_corpus_decodes_or_raises_image_decode_error(name, filename, data, size, tmp_path):
    path = tmp_path / filename
    path.write_bytes(data)
    for source in (data, path):
        if size is None:
            with pytest.raises(ImageDecodeError):
                open_rgb(source)
            continue
        image = open_rgb(source)
        assert image.mode == "RGB" and image.size == size, name
    if name == "animated gif":
        assert open_rgb(data).getpixel((0, 0)) == (255, 0, 0)  # the first frame
    if name == "palette with transparency":
        assert open_rgb(data).getpixel((0, 0)) == (255, 255, 255) and open_rgb(data).getpixel((8, 0)) == (255, 0, 0)
    if name == "cmyk jpeg":
        red, green, blue = open_rgb(data).getpixel((6, 4))
        assert red > 200 and green < 60 and blue < 60


def test_open_image_keeps_the_mode_of_label_and_depth_maps():
    from dinov2_hf.data import open_image

    mask = Image.new("P", (6, 4), 3)
    mask.putpalette(list(range(256)) * 3)
    assert open_image(encoded(mask, "PNG")).mode == "P"
    depth = open_image(sixteen_bit())
    assert depth.mode in ("I;16", "I") and np.asarray(depth).max() == (15 * 11 - 1) * 300
    with pytest.raises(ImageDecodeError, match="over the limit"):
        open_image(encoded(mask, "PNG"), max_pixels=10)
