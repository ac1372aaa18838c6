"""Robust decoding: every readable image becomes RGB, unreadable ones raise ImageDecodeError."""

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from dinov2_hf.data import MAX_IMAGE_PIXELS, ImageDecodeError, open_rgb


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


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and header announcing ``width`` x ``height`` with no pixel data: a decompression bomb's
    first bytes, for free."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def exif_rotated_jpeg() -> bytes:
    """64x32 as stored, with EXIF orientation 6 (rotate 90 degrees clockwise to display): 32x64 as displayed.
    The left half is red and the right half blue, so a wrong turn shows in the pixels."""
    image = Image.new("RGB", (64, 32), (255, 0, 0))
    image.paste((0, 0, 255), (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif, quality=95)
    return buffer.getvalue()


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


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (12, 10), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


def palette_with_transparency() -> bytes:
    image = Image.new("P", (9, 7), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.paste(1, (0, 0, 3, 7))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=1)  # palette index 1 (green) is transparent: white once composited
    return buffer.getvalue()


def sixteen_bit() -> bytes:
    array = (np.arange(15 * 11).reshape(11, 15) * 300).astype(np.uint16)
    data = encoded(Image.fromarray(array), "PNG")
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")  # 16-bit grayscale (older Pillow: "I")
    return data


def cmyk_jpeg() -> bytes:
    data = encoded(Image.new("CMYK", (13, 9), (0, 255, 255, 0)), "JPEG")
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    return data


# name, file name, bytes, expected (width, height) or None for ImageDecodeError
CORPUS = [
    ("truncated", "truncated.jpg", encoded(Image.new("RGB", (64, 64), (10, 20, 30)), "JPEG")[:300], None),
    ("zero bytes", "empty.jpg", b"", None),
    ("text named .jpg", "notes.jpg", b"this is a text file, not a JPEG\n" * 4, None),
    ("cmyk jpeg", "cmyk.jpg", cmyk_jpeg(), (13, 9)),
    ("16-bit png", "depth.png", sixteen_bit(), (15, 11)),
    ("palette with transparency", "palette.png", palette_with_transparency(), (9, 7)),
    ("1x1", "pixel.png", encoded(Image.new("RGB", (1, 1), (7, 8, 9)), "PNG"), (1, 1)),
    ("animated gif", "animated.gif", animated_gif(), (12, 10)),
    ("exif rotated", "rotated.jpg", exif_rotated_jpeg(), (32, 64)),
    ("oversized", "huge.png", png_header(20_000, 20_000), None),
]


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
