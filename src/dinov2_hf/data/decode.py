"""Robust image decoding: every readable image becomes RGB, upright as displayed; others raise ImageDecodeError.

Images larger than :data:`MAX_IMAGE_PIXELS` (or the ``max_pixels`` given to :func:`open_rgb`, from
``data.max_image_pixels``) are refused from their header, before any pixel is decoded, with an
:class:`ImageDecodeError` that loaders count and skip like any other bad image.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from pathlib import Path

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

MAX_IMAGE_PIXELS = 178_956_970
"""Default pixel limit (width x height) of :func:`open_rgb`: PIL's own decompression-bomb error threshold
(2 x ``PIL.Image.MAX_IMAGE_PIXELS`` at its default), about 13,000 x 13,000 or 537 MB as RGB. A larger
``max_pixels`` only helps once ``PIL.Image.MAX_IMAGE_PIXELS`` (process-wide, PIL's setting) is raised too:
PIL refuses such images itself, which :func:`open_rgb` also reports as :class:`ImageDecodeError`."""

# Errors PIL raises on broken, truncated or hostile files (struct.error and EOFError from short headers).
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError)
# Oversized per PIL's global limit; the warning only raises when warnings are turned into errors.
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class ImageDecodeError(ValueError):
    """An image that cannot be decoded (missing, empty, truncated, oversized, not an image): skipped and counted."""


def open_rgb(
    source: str | Path | bytes | Image.Image, *, max_pixels: int | None = None, draft: Callable[[int, int], int] | None = None
) -> Image.Image:
    """Decode ``source`` (a path, encoded bytes or a PIL image) into an RGB PIL image, upright as displayed.

    Grayscale, palette, RGBA (composited on white, as browsers show it), CMYK and 16-bit images
    are converted to RGB; an animated image gives its first frame. The EXIF orientation is applied
    (``PIL.ImageOps.exif_transpose``, as ``datasets``' Image feature and transformers' ``load_image`` do).
    An image of more than ``max_pixels`` pixels (default :data:`MAX_IMAGE_PIXELS`) is refused from its
    header, before decoding. Anything that cannot be decoded raises :class:`ImageDecodeError`.

    ``draft(width, height)``, called once with the upright size from the header before any pixel is decoded,
    returns a reduction factor (1, 2, 4 or 8): a JPEG is then decoded at 1/factor of its size by the decoder's
    DCT scaling (``Image.draft``), about ``factor**2`` times less work; the result is ``ceil(size / factor)``
    pixels. Other formats ignore it (compare the returned size with the one ``draft`` was given).
    """
    return _decode(source, max_pixels, _to_rgb, draft)


def open_image(source: str | Path | bytes | Image.Image, *, max_pixels: int | None = None) -> Image.Image:
    """Decode ``source`` like :func:`open_rgb` (upright, size-checked, errors as :class:`ImageDecodeError`)
    but keep its mode: for label maps and depth maps, whose values must not be turned into colours."""
    return _decode(source, max_pixels, lambda image: image)


def _decode(
    source, max_pixels: int | None, finish: Callable[[Image.Image], Image.Image], draft: Callable[[int, int], int] | None = None
) -> Image.Image:
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if limit < 1:
        raise ValueError(f"max_pixels must be a positive number of pixels; got {limit}.")
    name = str(source) if isinstance(source, (str, Path)) else type(source).__name__
    opened = None  # an image this call opened (and so closes once done with it)
    try:
        if isinstance(source, Image.Image):
            image = source
        else:
            if isinstance(source, (bytes, bytearray)):
                if not source:
                    raise ImageDecodeError("empty image bytes")
                stream = io.BytesIO(source)
            else:
                path = Path(source)
                if not path.is_file():
                    raise ImageDecodeError(f"no such image file: {path}")
                if path.stat().st_size == 0:
                    raise ImageDecodeError(f"empty image file: {path}")
                stream = path
            image = opened = Image.open(stream)  # lazy: reads the header only
        # Checked before decoding: one huge image would otherwise exhaust a DataLoader worker's memory.
        if image.width * image.height > limit:
            raise ImageDecodeError(
                f"image {name} is {image.width}x{image.height} = {image.width * image.height:,} pixels, "
                f"over the limit of {limit:,} (max_pixels, data.max_image_pixels)"
            )
        if draft is not None:
            _apply_draft(image, draft, reducible=opened is not None)
        image.load()  # decode now, so truncated files fail here and not in a worker later
        result = finish(_upright(image))
    except ImageDecodeError:
        _close(opened)
        raise
    except _BOMB_ERRORS as error:
        _close(opened)
        raise ImageDecodeError(f"image {name} is too large to decode (PIL's limit): {error}") from error
    except _DECODE_ERRORS as error:
        _close(opened)
        raise ImageDecodeError(f"cannot decode image {name}: {error}") from error
    if opened is not None and result is not opened:
        opened.close()  # multi-frame files keep their file open until closed
    return result


_SWAPPED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees


def _apply_draft(image: Image.Image, draft: Callable[[int, int], int], reducible: bool) -> None:
    """Ask ``draft`` for a reduction factor from the upright size; a JPEG this call opened is decoded reduced."""
    width, height = image.size
    try:
        swapped = image.getexif().get(ExifTags.Base.Orientation, 1) in _SWAPPED_ORIENTATIONS
    except _DECODE_ERRORS:
        swapped = False
    factor = draft(*((height, width) if swapped else (width, height)))
    if factor > 1 and reducible and image.format == "JPEG":
        image.draft(image.mode, (max(width // factor, 1), max(height // factor, 1)))


def _close(image: Image.Image | None) -> None:
    if image is not None:
        image.close()


def _upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says it is displayed (itself when it has none)."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except _DECODE_ERRORS:
        return image  # a malformed EXIF block costs the orientation, not the image
    if orientation in (None, 1):
        return image  # exif_transpose would copy the image for nothing
    return ImageOps.exif_transpose(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in _WIDE_GRAY_MODES:
        # 16/32-bit integer or float grayscale: scale to 8 bits instead of clipping.
        import numpy as np

        array = np.nan_to_num(np.asarray(image, dtype=np.float64))
        high = array.max() if array.max() > 0 else 1.0
        return Image.fromarray(np.clip(array / high * 255, 0, 255).astype("uint8")).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


SAMPLE_IMAGES = ("china.jpg", "flower.jpg")  # scikit-learn's sample photographs: real images without a download


def load_image(name: str | Path) -> Image.Image:
    """An RGB image from a file, or one of scikit-learn's sample images by name (``china.jpg``, ``flower.jpg``)."""
    path = Path(name)
    if path.is_file():
        return open_rgb(path)
    if str(name) in SAMPLE_IMAGES:
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(str(name)))
    raise FileNotFoundError(f"Image {str(name)!r} is neither a file nor a built-in sample ({', '.join(SAMPLE_IMAGES)}).")
