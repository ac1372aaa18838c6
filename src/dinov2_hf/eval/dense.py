"""Dense tasks on frozen patch tokens: linear semantic segmentation and linear depth estimation.

Both heads are a 1x1 convolution on the last block's normalised patch tokens, upsampled bilinearly
to the label resolution (the DINOv2 paper's "lin." setting, without its BatchNorm). Features are
extracted once (the backbone is frozen) and the head trains on them in memory.

Metrics: segmentation mIoU (classes absent from both prediction and ground truth are left out of
the mean), per-class IoU and pixel accuracy from one confusion matrix over the whole set; depth
RMSE, log-RMSE (of natural logs), absolute relative error and delta<1.25 over valid pixels (> 0).

:func:`pasted_objects` builds a small dense dataset from real images with exact ground truth:
objects (e.g. CIFAR images) pasted on real backgrounds, with their masks and a depth map (a
receding background plane, objects standing in front of it).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..modeling.processor import IMAGENET_MEAN, IMAGENET_STD

IGNORE_INDEX = 255


def to_pixel_values(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """Square-resize (bicubic) and ImageNet-normalise: dense labels stay aligned (no crop)."""
    arrays = [np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255 for image in images]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@torch.inference_mode()
def patch_feature_maps(model: torch.nn.Module, pixel_values: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """(n, dim, h, w) normalised patch tokens of the last block (registers excluded), float32 on CPU."""
    device = next(model.parameters()).device
    maps = [model.get_intermediate_layers(chunk.to(device), n=1, reshape=True)[0].float().cpu()
            for chunk in pixel_values.split(batch_size)]
    return torch.cat(maps)


class LinearDenseHead(torch.nn.Module):
    """1x1 convolution on patch-token maps, bilinearly upsampled to the target size."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, feature_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.conv(feature_maps), size=size, mode="bilinear", align_corners=False)


@dataclass
class HeadTraining:
    """Optimisation of a dense head on cached features (AdamW, cosine schedule)."""

    epochs: int = 20
    lr: float = 1e-2
    batch_size: int = 16
    weight_decay: float = 1e-4
    seed: int = 0


def _fit(head: torch.nn.Module, maps: torch.Tensor, targets: torch.Tensor, loss_fn, settings: HeadTraining) -> torch.nn.Module:
    if len(maps) != len(targets):
        raise ValueError(f"{len(maps)} feature maps but {len(targets)} targets; they must pair up.")
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps = settings.epochs * -(-len(maps) // settings.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    size = tuple(targets.shape[-2:])
    for _ in range(settings.epochs):
        for batch in torch.randperm(len(maps), generator=generator).split(settings.batch_size):
            loss = loss_fn(head(maps[batch], size), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return head.eval()


def train_segmentation_head(
    maps: torch.Tensor, masks: torch.Tensor, num_classes: int, settings: HeadTraining | None = None
) -> LinearDenseHead:
    """A linear segmentation head on (n, dim, h, w) features for (n, H, W) class masks (255 = ignore)."""
    if masks.ndim != 3 or masks.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise ValueError(f"masks must be (n, H, W) integer class maps; got {tuple(masks.shape)} {masks.dtype}.")
    labels = masks.long()
    if ((labels >= num_classes) & (labels != IGNORE_INDEX)).any():
        raise ValueError(f"masks hold class ids >= num_classes={num_classes} (other than {IGNORE_INDEX}, ignored).")
    head = LinearDenseHead(maps.shape[1], num_classes)
    return _fit(head, maps, labels, lambda logits, y: F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX), settings or HeadTraining())


def train_depth_head(maps: torch.Tensor, depths: torch.Tensor, settings: HeadTraining | None = None) -> LinearDenseHead:
    """A linear depth head (regressing depth, MSE over valid pixels > 0) for (n, H, W) depth maps."""
    if depths.ndim != 3:
        raise ValueError(f"depth maps must be (n, H, W); got {tuple(depths.shape)}.")

    def loss_fn(prediction, target):
        valid = target > 0
        return F.mse_loss(prediction[:, 0][valid], target[valid])

    head = LinearDenseHead(maps.shape[1], 1)
    with torch.no_grad():  # start from the mean depth: the weights then only model the variation
        head.conv.bias.fill_(depths[depths > 0].float().mean().item())
    return _fit(head, maps, depths.float(), loss_fn, settings or HeadTraining())


def confusion_matrix(predictions: torch.Tensor, masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts, rows = ground truth, columns = prediction; ignored pixels dropped."""
    valid = masks != IGNORE_INDEX
    index = masks[valid].long() * num_classes + predictions[valid].long()
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def segmentation_metrics(predictions: torch.Tensor, masks: torch.Tensor, num_classes: int) -> dict:
    """mIoU, per-class IoU (None for classes in neither prediction nor ground truth) and pixel accuracy."""
    confusion = confusion_matrix(predictions, masks, num_classes).double()
    true_positive = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    iou = true_positive / union  # nan where union == 0
    present = union > 0
    return {
        "miou": iou[present].mean().item(),
        "per_class_iou": [v if p else None for v, p in zip(iou.tolist(), present.tolist())],
        "pixel_accuracy": (true_positive.sum() / confusion.sum()).item(),
    }


def depth_metrics(prediction: torch.Tensor, target: torch.Tensor, min_depth: float = 1e-3) -> dict[str, float]:
    """RMSE, log-RMSE, abs-rel and delta<1.25 over pixels with target > 0 (predictions clamped to ``min_depth``)."""
    valid = target > 0
    if not valid.any():
        raise ValueError("no valid depth pixels (all targets are <= 0).")
    pred, gt = prediction[valid].double().clamp(min=min_depth), target[valid].double()
    ratio = torch.maximum(pred / gt, gt / pred)
    return {
        "rmse": (pred - gt).pow(2).mean().sqrt().item(),
        "log_rmse": (pred.log() - gt.log()).pow(2).mean().sqrt().item(),
        "abs_rel": ((pred - gt).abs() / gt).mean().item(),
        "delta1": (ratio < 1.25).double().mean().item(),
    }


@torch.no_grad()
def predict(head: LinearDenseHead, maps: torch.Tensor, size: tuple[int, int], batch_size: int = 32) -> torch.Tensor:
    """Class maps (segmentation head) or depth maps (depth head) at ``size``."""
    outputs = torch.cat([head(chunk, size) for chunk in maps.split(batch_size)])
    return outputs[:, 0] if outputs.shape[1] == 1 else outputs.argmax(1)


def pasted_objects(
    objects: Sequence[tuple[Image.Image, int]],
    backgrounds: Sequence[Image.Image],
    size: int = 112,
    object_size: tuple[int, int] = (40, 72),
    seed: int = 0,
) -> tuple[list[Image.Image], torch.Tensor, torch.Tensor]:
    """Images of one object pasted on a real background, with exact class masks and depth maps.

    Mask: 0 background, ``label + 1`` on the object. Depth: the background is a plane receding from
    2 (bottom) to 10 (top); the object stands at depth ``1 + (label % 5) / 4`` (a parallel plane).
    """
    rng = random.Random(seed)
    images, masks, depths = [], torch.zeros(len(objects), size, size, dtype=torch.long), torch.empty(len(objects), size, size)
    plane = torch.linspace(10.0, 2.0, size).view(size, 1).expand(size, size)
    for i, (obj, label) in enumerate(objects):
        background = backgrounds[rng.randrange(len(backgrounds))]
        w, h = background.size
        side = rng.randint(size, min(w, h))
        left, top = rng.randint(0, w - side), rng.randint(0, h - side)
        canvas = background.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
        extent = rng.randint(*object_size)
        x, y = rng.randint(0, size - extent), rng.randint(0, size - extent)
        canvas.paste(obj.convert("RGB").resize((extent, extent), Image.Resampling.BICUBIC), (x, y))
        images.append(canvas)
        masks[i, y : y + extent, x : x + extent] = label + 1
        depths[i] = plane
        depths[i, y : y + extent, x : x + extent] = 1 + (label % 5) / 4
    return images, masks, depths


def decode_target(value, kind: str, size: int, depth_scale: float = 1.0,
                  max_pixels: int | None = None) -> torch.Tensor:
    """A (size, size) class map (``kind="mask"``) or depth map (``kind="depth"``) from a dataset cell.

    The cell holds an image (bytes / path / PIL: palette or 8/16-bit PNG), or an array / nested list.
    Resizing is nearest-neighbour for both (bilinear would invent classes and blend invalid zeros).
    ``depth_scale`` divides depth values (e.g. 1000 for millimetre PNGs). Encoded maps are decoded with
    :func:`dinov2_hf.data.decode.open_image` (EXIF orientation applied as for the images, more than
    ``max_pixels`` pixels refused): an unreadable one raises :class:`~dinov2_hf.data.decode.ImageDecodeError`.
    """
    from ..data.decode import open_image

    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, str)):
        value = open_image(value, max_pixels=max_pixels)
    if isinstance(value, Image.Image):
        if kind == "mask" and value.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"segmentation masks must be single-channel class-index images; got mode {value.mode}.")
        array = np.asarray(value)
    else:
        array = np.asarray(value)
    if array.ndim != 2:
        raise ValueError(f"a {kind} map must be 2-d (H, W); got shape {array.shape}.")
    resized = Image.fromarray(array.astype(np.float32 if kind == "depth" else np.int32)).resize((size, size), Image.Resampling.NEAREST)
    result = torch.from_numpy(np.asarray(resized).copy())
    return result.float() / depth_scale if kind == "depth" else result.long()


def load_dense_split(stream, image_column: str, target_column: str, kind: str, size: int, max_images: int | None = None,
                     depth_scale: float = 1.0, reduce_zero_label: bool = False,
                     max_pixels: int | None = None, counter: dict | None = None) -> tuple[list[Image.Image], torch.Tensor]:
    """Images and their (n, size, size) targets from a streaming dataset; examples whose image or encoded
    target cannot be decoded, or has more than ``max_pixels`` pixels, are skipped (and counted in
    ``counter["skipped"]`` when given).

    ``reduce_zero_label`` (ADE20K convention): class 0 ("other") becomes ignored, the others shift down by one.
    """
    import itertools

    from ..data.decode import ImageDecodeError, open_rgb
    from ..data.sources import image_source

    images, targets = [], []
    for example in itertools.islice(stream, max_images):
        if target_column not in example:
            raise ValueError(f"column {target_column!r} not found; columns: {list(example)}.")
        try:
            image = open_rgb(image_source(example[image_column]), max_pixels=max_pixels)
            target = decode_target(example[target_column], kind, size, depth_scale, max_pixels)
        except ImageDecodeError:
            if counter is not None:
                counter["skipped"] += 1
            continue
        if kind == "mask" and reduce_zero_label:
            target = torch.where(target == 0, IGNORE_INDEX, target - 1)
        images.append(image)
        targets.append(target)
    if not images:
        raise ValueError("no decodable images with targets in this split.")
    return images, torch.stack(targets)
