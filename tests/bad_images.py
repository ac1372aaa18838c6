"""The bad-image corpus: ten kinds of image a user's folder may hold, readable or not (tests of decode and faults)."""

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


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
