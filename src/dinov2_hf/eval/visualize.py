"""The DINOv2 paper's figures from frozen features, saved as PNGs with PIL.

- :func:`pca_rgb` (Figure 1): PCA of the patch features of a set of images; the first component,
  thresholded, separates foreground from background; a second PCA on the foreground patches maps
  their first three components to RGB (background black).
- :func:`match_patches` (Figure 2): mutual nearest neighbours (cosine) between the patches of two
  images, optionally restricted to foreground; :func:`draw_matches` draws them as lines.
- :func:`cls_attention_maps`: the last block's attention from the CLS token to every patch, per
  head (eager attention gives the weights; register tokens are left out of the map).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw


def _pca(x: np.ndarray, n_components: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    # A fixed sign per component (largest |loading| positive), so the figure does not flip between runs.
    projected = PCA(n_components=n_components, random_state=0).fit(x)
    signs = np.sign(projected.components_[np.arange(n_components), np.abs(projected.components_).argmax(1)])
    return projected.transform(x) * signs


def pca_rgb(patch_maps: torch.Tensor, threshold: float = 0.0, foreground_sign: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(n, h, w, 3) uint8 RGB maps and (n, h, w) boolean foreground masks from (n, dim, h, w) patch features.

    Foreground: patches whose first principal component (over all images) times ``foreground_sign``
    exceeds ``threshold``; which sign is foreground depends on the model, hence the parameter.
    """
    if patch_maps.ndim != 4:
        raise ValueError(f"patch_maps must be (n, dim, h, w); got {tuple(patch_maps.shape)}.")
    n, dim, h, w = patch_maps.shape
    patches = patch_maps.permute(0, 2, 3, 1).reshape(-1, dim).double().numpy()
    foreground = foreground_sign * _pca(patches, 1)[:, 0] > threshold
    rgb = np.zeros((len(patches), 3))
    if foreground.sum() > 3:
        components = _pca(patches[foreground], 3)
        low, high = components.min(0), components.max(0)
        rgb[foreground] = (components - low) / np.where(high > low, high - low, 1)
    return (rgb * 255).round().astype(np.uint8).reshape(n, h, w, 3), foreground.reshape(n, h, w)


def match_patches(
    features_a: torch.Tensor, features_b: torch.Tensor, mask_a: torch.Tensor | None = None, mask_b: torch.Tensor | None = None,
    max_matches: int | None = None,
) -> list[tuple[int, int, float]]:
    """Mutual nearest-neighbour patch pairs ``(index in a, index in b, cosine)`` between two (dim, h, w) maps.

    Indices are row-major over the patch grid; ``mask_*`` (h, w) restrict to foreground patches;
    the ``max_matches`` most similar pairs are kept.
    """
    a = F.normalize(features_a.flatten(1).t().float(), dim=1)
    b = F.normalize(features_b.flatten(1).t().float(), dim=1)
    keep_a = torch.arange(len(a)) if mask_a is None else torch.nonzero(mask_a.flatten()).flatten()
    keep_b = torch.arange(len(b)) if mask_b is None else torch.nonzero(mask_b.flatten()).flatten()
    if len(keep_a) == 0 or len(keep_b) == 0:
        return []
    similarity = a[keep_a] @ b[keep_b].t()
    best_b, best_a = similarity.argmax(1), similarity.argmax(0)
    mutual = torch.nonzero(best_a[best_b] == torch.arange(len(keep_a))).flatten()
    pairs = sorted(((keep_a[i].item(), keep_b[best_b[i]].item(), similarity[i, best_b[i]].item()) for i in mutual),
                   key=lambda pair: -pair[2])
    return pairs[:max_matches] if max_matches else pairs


def draw_matches(image_a: Image.Image, image_b: Image.Image, matches: Sequence[tuple[int, int, float]], grid: tuple[int, int]) -> Image.Image:
    """Both images side by side (same size) with a line per match, from patch centre to patch centre."""
    if image_a.size != image_b.size:
        raise ValueError(f"draw_matches needs images of one size; got {image_a.size} and {image_b.size}.")
    width, height = image_a.size
    canvas = Image.new("RGB", (2 * width, height))
    canvas.paste(image_a.convert("RGB"), (0, 0))
    canvas.paste(image_b.convert("RGB"), (width, 0))
    draw = ImageDraw.Draw(canvas)
    rows, cols = grid
    cell_w, cell_h = width / cols, height / rows
    rng = np.random.RandomState(0)
    for index_a, index_b, _ in matches:
        ya, xa = divmod(index_a, cols)
        yb, xb = divmod(index_b, cols)
        start = ((xa + 0.5) * cell_w, (ya + 0.5) * cell_h)
        end = (width + (xb + 0.5) * cell_w, (yb + 0.5) * cell_h)
        draw.line([start, end], fill=tuple(int(c) for c in rng.randint(64, 256, 3)), width=1)
    return canvas


@torch.inference_mode()
def cls_attention_maps(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(batch, heads, h, w) attention of the last block's CLS query to the patch tokens (registers excluded)."""
    outputs = model(pixel_values, output_attentions=True)  # output_attentions switches to eager attention
    attention = outputs.attentions[-1]  # (batch, heads, tokens, tokens)
    first_patch = 1 + model.config.num_register_tokens
    grid = (pixel_values.shape[-2] // model.config.patch_size, pixel_values.shape[-1] // model.config.patch_size)
    return attention[:, :, 0, first_patch:].reshape(*attention.shape[:2], *grid).float()


def heatmap_grid(maps: torch.Tensor, size: tuple[int, int], columns: int | None = None) -> Image.Image:
    """(heads, h, w) maps, each min-max scaled, upsampled (nearest) to ``size`` and tiled in a grid."""
    heads = len(maps)
    columns = columns or heads
    rows = -(-heads // columns)
    width, height = size
    canvas = Image.new("L", (columns * width, rows * height))
    for i, single in enumerate(maps):
        low, high = single.min(), single.max()
        scaled = ((single - low) / (high - low if high > low else 1) * 255).round().byte().numpy()
        tile = Image.fromarray(scaled, mode="L").resize((width, height), Image.Resampling.NEAREST)
        canvas.paste(tile, ((i % columns) * width, (i // columns) * height))
    return canvas


def save_figures(
    model: torch.nn.Module, images: Sequence[Image.Image], output_dir: str | Path, size: int = 224, foreground_sign: int = 1
) -> dict[str, list[Path]]:
    """PCA maps of all images, patch matches between consecutive pairs and per-head CLS attention, as PNGs."""
    from .dense import patch_feature_maps, to_pixel_values

    if len(images) == 0:
        raise ValueError("save_figures needs at least one image.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resized = [image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC) for image in images]
    pixel_values = to_pixel_values(images, size)
    maps = patch_feature_maps(model, pixel_values)
    rgb, foreground = pca_rgb(maps, foreground_sign=foreground_sign)
    written: dict[str, list[Path]] = {"pca": [], "matches": [], "attention": []}
    attention = cls_attention_maps(model, pixel_values.to(next(model.parameters()).device)).cpu()
    for i, image in enumerate(resized):
        pca_image = Image.fromarray(rgb[i]).resize((size, size), Image.Resampling.NEAREST)
        pair = Image.new("RGB", (2 * size, size))
        pair.paste(image, (0, 0))
        pair.paste(pca_image, (size, 0))
        written["pca"].append(output_dir / f"pca_{i:03d}.png")
        pair.save(written["pca"][-1])
        written["attention"].append(output_dir / f"attention_{i:03d}.png")
        heatmap_grid(attention[i], (size, size)).save(written["attention"][-1])
    for i in range(len(resized) - 1):
        matches = match_patches(maps[i], maps[i + 1], torch.from_numpy(foreground[i]), torch.from_numpy(foreground[i + 1]), max_matches=50)
        written["matches"].append(output_dir / f"matches_{i:03d}_{i + 1:03d}.png")
        draw_matches(resized[i], resized[i + 1], matches, maps.shape[-2:]).save(written["matches"][-1])
    return written


def pca_figure(model: torch.nn.Module, image: Image.Image, size: int = 224) -> Image.Image:
    """``image`` and the PCA map of its patch features side by side (the model card's feature figure)."""
    from .dense import patch_feature_maps, to_pixel_values

    maps = patch_feature_maps(model, to_pixel_values([image], size))
    rgb, _ = pca_rgb(maps)
    pair = Image.new("RGB", (2 * size, size))
    pair.paste(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), (0, 0))
    pair.paste(Image.fromarray(rgb[0]).resize((size, size), Image.Resampling.NEAREST), (size, 0))
    return pair
