"""Data: robust image decoding (multi-crop, masking and streaming sources come with the trainer)."""

from .decode import ImageDecodeError, open_rgb

__all__ = ["ImageDecodeError", "open_rgb"]
