"""Data: image decoding, streaming sources, multi-crop transforms, iBOT masking and collation."""

from .decode import ImageDecodeError, load_image, open_rgb

__all__ = ["ImageDecodeError", "load_image", "open_rgb"]
