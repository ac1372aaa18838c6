"""Shared helpers of the curation tests: CIFAR rows, planted copies, a fixed copy-detection embedder."""

from __future__ import annotations

import io
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageEnhance, ImageOps


def cifar_rows(cifar_dir, split: str = "test", start: int = 0, count: int = 100) -> list[dict]:
    files = sorted(cifar_dir.glob(f"{split}-*.parquet"))
    return pq.read_table(files[0]).slice(start, count).to_pylist()


def augmented_copy(data: bytes, rng: random.Random) -> bytes:
    """A near-duplicate as copy detection knows them: small crop + resize back, maybe a mirror,
    brightness / contrast / saturation jitter, JPEG re-encoding at quality 50-90."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    side = rng.uniform(0.9, 1.0)
    crop_w, crop_h = round(width * side), round(height * side)
    left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
    image = image.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.BICUBIC)
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(rng.uniform(0.8, 1.2))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=rng.randint(50, 90))
    return buffer.getvalue()


def write_images(path, images: list[bytes], labels: list[int] | None = None) -> None:
    """A parquet file with the datasets Image feature layout (struct of bytes and path)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {"image": [{"bytes": b, "path": None} for b in images]}
    if labels is not None:
        columns["label"] = labels
    pq.write_table(pa.table(columns), path)


class ThumbnailEmbedder:
    """A fixed copy-detection descriptor standing in for a trained backbone, which tests cannot download.

    A randomly initialised ViT cannot tell copies from other images (its CLS embeddings of distinct
    CIFAR images reach cosine 0.99), so the dedup acceptance test uses this: an 8x8 YCbCr thumbnail
    (box filter: robust to resizing and JPEG), mirror-symmetrised (robust to flips), standardised per
    channel (robust to brightness / contrast), then PCA-whitened with a map fitted once on other images
    (CIFAR train), keeping 32 components, as copy-detection descriptors are whitened (SSCD).
    """

    signature = "thumbnail-8x8-ycbcr-sym-pca32"

    def __init__(self, fit_images: list[bytes], components: int = 32, size: int = 8) -> None:
        self.size = size
        raw = self._raw([Image.open(io.BytesIO(b)) for b in fit_images])
        self.mean = raw.mean(0)
        _, singular, vt = np.linalg.svd(raw - self.mean, full_matrices=False)
        self.projection = vt[:components].T / np.sqrt(singular[:components])

    def _raw(self, images) -> np.ndarray:
        rows = []
        for image in images:
            pixels = np.asarray(image.convert("YCbCr").resize((self.size, self.size), Image.BOX), dtype=np.float64)
            pixels = pixels - pixels.mean((0, 1))
            pixels = pixels / (pixels.std((0, 1)) + 1e-3)
            pixels[..., 1:] *= 0.5  # colour counts half as much as luminance
            pixels = pixels + pixels[:, ::-1]
            rows.append(pixels.ravel())
        return np.stack(rows)

    def __call__(self, images) -> np.ndarray:
        features = (self._raw(images) - self.mean) @ self.projection
        return (features / np.linalg.norm(features, axis=1, keepdims=True)).astype(np.float32)
