"""Data: image decoding, streaming sources, multi-crop transforms, iBOT masking and collation."""

from .decode import MAX_IMAGE_PIXELS, ImageDecodeError, load_image, open_image, open_rgb

__all__ = ["MAX_IMAGE_PIXELS", "ImageDecodeError", "load_image", "open_image", "open_rgb"]
