"""Robust image decoding: every readable image becomes RGB; unreadable ones raise ImageDecodeError."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError


class ImageDecodeError(ValueError):
    """An image could not be decoded (missing, empty, truncated or not an image). Loaders count and skip it."""


def open_rgb(source: str | Path | bytes | Image.Image) -> Image.Image:
    """Decode ``source`` (a path, encoded bytes or a PIL image) into an RGB PIL image.

    Grayscale, palette, RGBA (composited on white, as browsers show it), CMYK and 16-bit images
    are converted to RGB. Anything that cannot be decoded raises :class:`ImageDecodeError`.
    """
    name = str(source) if isinstance(source, (str, Path)) else type(source).__name__
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
            image = Image.open(stream)
            image.load()  # decode now, so truncated files fail here and not in a worker later
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageDecodeError(f"cannot decode image {name}: {error}") from error
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping.
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        high = array.max() or 1.0
        return Image.fromarray((array / high * 255).astype("uint8")).convert("RGB")
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
