"""DINOv2 multi-crop augmentation, split where it is fastest.

1. :class:`MultiCropGeometry` (CPU, in DataLoader workers, per image): 2 global and N local
   RandomResizedCrops (bicubic, aspect ratio 3/4-4/3) with random horizontal flips, each crop box one
   bicubic resize (PIL's, or torch's antialiased one on the image as one uint8 tensor: ``crops.resize``),
   returned as uint8 tensors; or, with ``crops.resize=device``, only the boxes, the decoded image being cropped
   on the training device with the rest of its batch (:func:`crops_from_boxes`).
   Decoding is the caller's (:func:`dinov2_hf.data.open_rgb`); the boxes can be drawn from the image
   size before decoding (:meth:`MultiCropGeometry.plan`), so that a JPEG much larger than every crop
   is decoded reduced (:func:`~dinov2_hf.data.sources.open_for_crops`, as ``MultiCropStream`` does).
2. :class:`BatchedPhotometric` (on the training device, per batch): color jitter (brightness 0.4,
   contrast 0.4, saturation 0.2, hue 0.1, random order, p=0.8), grayscale (p=0.2), Gaussian blur
   (kernel 9, sigma 0.1-2), solarize (threshold 128/255, global crop 2 only, p=0.2) and ImageNet
   normalisation, with independent random parameters per image, vectorised over the batch.

The operations follow torchvision's definitions, which the official code applies per image on PIL
images. Gaussian blur probabilities: the paper intends 1.0 / 0.1 / 0.5 (global 1 / global 2 /
local); the official code passes ``1 - p`` to ``RandomApply`` and so applies 0.0 / 0.9 / 0.5.
``blur="intended"`` (default) or ``blur="official"`` picks one.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..modeling.processor import IMAGENET_MEAN, IMAGENET_STD

BLUR_PROBABILITIES = {"intended": (1.0, 0.1, 0.5), "official": (0.0, 0.9, 0.5), "none": (0.0, 0.0, 0.0)}
BLUR_KERNEL_SIZE, BLUR_SIGMA = 9, (0.1, 2.0)  # torchvision GaussianBlur(9, (0.1, 2.0)) at 224 px, as the official code


@dataclass
class MultiCropSettings:
    """The ``crops:`` section of a recipe: multi-crop geometry (sizes in pixels, scales as fractions of the
    image area) and the photometric settings that depend on the crop."""

    global_crops_size: int = 224
    local_crops_size: int = 98
    local_crops_number: int = 8
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    flip_probability: float = 0.5  # horizontal flips (0 for images whose mirror image means something else: digits, text)
    # Photometric (BatchedPhotometric.for_crops): blur probabilities, ``intended`` (the paper's 1.0/0.1/0.5),
    # ``official`` (the code's 0.0/0.9/0.5) or ``none``; ``blur_reference_size``: 0 keeps the official 224-px blur
    # (kernel 9, sigma 0.1-2) at any crop size, N scales kernel and sigma by ``global_crops_size / N``.
    blur: Literal["intended", "official", "none"] = "intended"
    blur_reference_size: int = 0
    # How each crop box is resized (MultiCropGeometry): ``pil``, one PIL bicubic resize per crop (the recipes'
    # measured figures), or ``torch``, the image as one uint8 tensor and torch's antialiased bicubic per crop
    # (about 2.5x faster on the CPU side, scripts/bench_data.py; the same boxes, pixels within a few levels), or
    # ``device``, for small images of one size (CIFAR-scale): workers only decode and draw the boxes, and the batch
    # is cropped on the training device in two bicubic sampling calls (no antialiasing: boxes about the crop size).
    resize: Literal["pil", "torch", "device"] = "pil"


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (left, top, right, bottom), ratio 3/4-4/3, 10 tries then center."""
    area = width * height
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, left + w, top + h
    # Fallback: the largest center crop with the ratio clamped into range.
    in_ratio = width / height
    if in_ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif in_ratio > 4 / 3:
        h, w = height, int(round(height * (4 / 3)))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


@dataclass
class CropPlan:
    """The crops of one image, drawn from its upright size before decoding: ``crops`` holds (output size, box
    (left, top, right, bottom) in pixels of the full image, flip) per crop, global crops first; ``reduction``
    is the largest JPEG draft factor (1, 2, 4 or 8) that leaves every box at least its output size."""

    width: int
    height: int
    crops: list[tuple[int, tuple[int, int, int, int], bool]]
    reduction: int = 1

    def boxes(self, width: int, height: int) -> list[tuple[int, int, int, int]]:
        """The crop boxes in a ``width`` x ``height`` decoding of the image (reduced: scaled, rounded outwards)."""
        if (width, height) == (self.width, self.height):
            return [box for _, box, _ in self.crops]
        sx, sy = width / self.width, height / self.height
        return [
            (math.floor(x0 * sx), math.floor(y0 * sy), min(math.ceil(x1 * sx), width), min(math.ceil(y1 * sy), height))
            for _, (x0, y0, x1, y1), _ in self.crops
        ]


class MultiCropGeometry:
    """Per-image geometric part of the multi-crop: crops + flips, as uint8 (3, S, S) tensors.

    ``resize`` (default: the settings' ``resize``, ``"pil"``): ``"pil"`` does one ``Image.resize(box=...)`` per
    crop; ``"torch"`` converts the decoded image to a tensor once and resizes every crop box with torch's uint8
    antialiased bicubic interpolation (PIL's filter, about 3x faster); ``"device"`` returns the decoded image as
    a uint8 tensor and its ``crop_boxes`` for :func:`crops_from_boxes`. All draw the same boxes and flips from
    ``rng`` in the same order (per crop: box, then flip). ``plan`` draws them from the image size alone, so that
    a JPEG can be decoded reduced (:func:`dinov2_hf.data.sources.open_for_crops`) when every crop is much smaller
    than it.
    """

    def __init__(
        self, settings: MultiCropSettings | None = None, seed: int | None = None, resize: Literal["pil", "torch", "device"] | None = None
    ) -> None:
        self.settings = settings if settings is not None else MultiCropSettings()
        resize = resize if resize is not None else self.settings.resize
        if resize not in ("pil", "torch", "device"):
            raise ValueError(f"resize={resize!r}: choose 'pil', 'torch' or 'device'.")
        self.rng = random.Random(seed)
        self.resize = resize

    def plan(self, width: int, height: int) -> CropPlan:
        """Draw the boxes and flips of one ``width`` x ``height`` image (the draws of ``__call__``)."""
        s, crops = self.settings, []
        for size, scale, count in (
            (s.global_crops_size, s.global_crops_scale, 2),
            (s.local_crops_size, s.local_crops_scale, s.local_crops_number),
        ):
            for _ in range(count):
                box = random_resized_crop_box(width, height, scale, self.rng)
                flip = self.rng.random() < s.flip_probability  # (drawn whatever the probability: same RNG stream)
                crops.append((size, box, flip))
        # The largest reduction that keeps every box at least its output size on both sides; none for device
        # crops, whose batch stacks the decoded images (a reduction per image would give images of several sizes).
        room = min(min(box[2] - box[0], box[3] - box[1]) / size for size, box, _ in crops)
        reduction = next((f for f in (8, 4, 2) if room >= f), 1) if self.resize != "device" else 1
        return CropPlan(width, height, crops, reduction)

    def __call__(self, image: Image.Image, plan: CropPlan | None = None) -> dict[str, list[torch.Tensor]]:
        """Crops of ``image``, by ``plan`` if given (drawn for the full-size image of which ``image`` may be a
        reduced decoding), else drawn now."""
        if plan is None:
            plan = self.plan(image.width, image.height)
        boxes = plan.boxes(image.width, image.height)
        if self.resize == "pil":
            crops = [self._pil_crop(image, size, box, flip) for (size, _, flip), box in zip(plan.crops, boxes)]
            return {"global_crops": crops[:2], "local_crops": crops[2:]}
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W), a channels-last view
        if self.resize == "device":
            # One row per crop, global crops first: output size, box in the decoded image's pixels, flip.
            rows = [(size, *box, float(flip)) for (size, _, flip), box in zip(plan.crops, boxes)]
            return {"image": pixels.contiguous(), "crop_boxes": torch.tensor(rows, dtype=torch.float32)}
        crops = [self._torch_crop(pixels[None], size, box, flip) for (size, _, flip), box in zip(plan.crops, boxes)]
        return {"global_crops": crops[:2], "local_crops": crops[2:]}

    @staticmethod
    def _pil_crop(image: Image.Image, size: int, box, flip: bool) -> torch.Tensor:
        crop = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
        if flip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1)

    @staticmethod
    def _torch_crop(pixels: torch.Tensor, size: int, box, flip: bool) -> torch.Tensor:
        left, top, right, bottom = box
        region = pixels[:, :, top:bottom, left:right]
        crop = F.interpolate(region, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
        if flip:
            crop = crop.flip(-1)
        return crop.contiguous()


def crops_from_boxes(images: torch.Tensor, crop_boxes: torch.Tensor, n_global: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a batch's crops where its images are (``crops.resize=device``): ``images`` (B, 3, H, W) uint8, the
    decoded images of one size; ``crop_boxes`` (B, n, 6), ``MultiCropGeometry``'s rows (output size, left, top,
    right, bottom, flip), global crops first. Returns the global (n_global B, 3, S, S) and local crops, crop-major
    as ``MultiCropCollator.stack``, float in [0, 1].

    One bicubic ``grid_sample`` per crop size: each output pixel centre is mapped into its box (align_corners=False,
    as ``F.interpolate``; a flip negates the x scale); borders clamp. Sampling does not antialias, so it suits
    boxes about the size of their crop (CIFAR-scale images), not large images cropped far down.
    """
    batch, _, height, width = images.shape
    image = images.float().div_(255)
    sizes = crop_boxes[0, :, 0].tolist()  # from the CPU copy when there is one: no device synchronisation

    def sample(rows: slice) -> torch.Tensor:
        boxes = crop_boxes[:, rows].transpose(0, 1).reshape(-1, 6).to(images.device)  # crop-major
        size = int(sizes[rows][0])
        _, left, top, right, bottom, flip = boxes.unbind(1)
        # Normalised coordinates: -1 and 1 are the image's outer edges; the box's edges map to the output's edges.
        centres = ((torch.arange(size, device=images.device, dtype=image.dtype) + 0.5) / size * 2 - 1).view(1, 1, -1)
        x = centres * ((right - left) / width * (1 - 2 * flip)).view(-1, 1, 1) + ((left + right) / width - 1).view(-1, 1, 1)
        y = centres.transpose(1, 2) * ((bottom - top) / height).view(-1, 1, 1) + ((top + bottom) / height - 1).view(-1, 1, 1)
        grid = torch.stack(torch.broadcast_tensors(x, y), dim=-1)  # (n B, S, S, 2), x then y
        source = image.repeat(len(boxes) // batch, 1, 1, 1)  # crop-major: image b at rows b, B + b, ...
        return F.grid_sample(source, grid, mode="bicubic", padding_mode="border", align_corners=False).clamp_(0, 1)

    global_crops = sample(slice(0, n_global))
    local_crops = sample(slice(n_global, None)) if crop_boxes.shape[1] > n_global else global_crops[:0]
    return global_crops, local_crops


# -- batched photometric operations (float images in [0, 1], shape (B, 3, H, W)) ------------------


LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, (B, 1, H, W), as torchvision's rgb_to_grayscale."""
    r, g, b = images.unbind(dim=1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def adjust_brightness(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return (images * _per_image(factors)).clamp_(0, 1)


def adjust_contrast(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    # The mean of the grayscale image, from the channel means (one pass, no grayscale image).
    weights = torch.tensor(LUMA, device=images.device, dtype=images.dtype)
    mean = (images.mean(dim=(2, 3)) * weights).sum(dim=1).view(-1, 1, 1, 1)
    f = _per_image(factors)
    return (images * f).add_((1 - f) * mean).clamp_(0, 1)


def adjust_saturation(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    f = _per_image(factors)
    return (images * f).add_(_grayscale(images).mul_(1 - f)).clamp_(0, 1)


def adjust_hue(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shifts`` (fractions of a turn) in HSV space, as torchvision's adjust_hue.

    RGB -> (H, S, V) as torchvision's _rgb2hsv, with the hue in sixths of a turn ``(offset + (x - y) / chroma)``
    (offset 0, 2, 4 where red, green, blue is the largest channel; grey pixels get 0); back with the closed form
    ``channel_n = V - V * S * clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6 H) mod 6``, n = 5, 3, 1 for R, G, B:
    the same piecewise-linear map as the six-sector table, without materialising it (V * S = chroma).
    """
    r, g, b = images.unbind(dim=1)
    max_c = torch.maximum(torch.maximum(r, g), b)
    chroma = max_c - torch.minimum(torch.minimum(r, g), b)
    is_r = max_c == r
    is_g = (max_c == g).logical_and_(is_r.logical_not())
    is_b = is_r.logical_or(is_g).logical_not_()
    # The sector picked by multiplying with 0/1 masks: torch.where with scalar branches is about twice as slow on
    # CPU (the same values). Grey pixels: is_r and g - b = 0, so 0 / (clamped) 0 = 0.
    in_r, in_g, in_b = (mask.to(images.dtype) for mask in (is_r, is_g, is_b))
    hue6 = torch.sub(g, b).mul_(in_r).addcmul_(torch.sub(b, r), in_g).addcmul_(torch.sub(r, g), in_b)
    hue6 = hue6.div_(chroma.clamp(min=1e-30)).add_(in_g, alpha=2.0).add_(in_b, alpha=4.0)  # in [-1, 5)
    # torchvision's fmod(h / 6 + 1, 1), shifted and wrapped: in sixths of a turn, one remainder
    hue6 = hue6.add_(shifts.view(-1, 1, 1).to(hue6.dtype) * 6.0).remainder_(6.0)
    out = torch.empty_like(images)
    for channel, n in enumerate((5.0, 3.0, 1.0)):
        k = torch.add(hue6, n).remainder_(6.0)
        weight = torch.minimum(k, torch.sub(4.0, k)).clamp_(0.0, 1.0)
        torch.addcmul(max_c, chroma, weight, value=-1.0, out=out[:, channel])
    return out.clamp_(0, 1)


def blur_kernel_size(scale: float) -> int:
    """The official kernel (9 px at 224 px crops) scaled by ``scale``: the odd size nearest ``9 * scale``, at least 3."""
    return max(2 * round((BLUR_KERNEL_SIZE - 1) / 2 * scale) + 1, 3)


def _blur_one_image_at_a_time(images: torch.Tensor) -> bool:
    """On CPU, crops larger than 128x128 blur faster one at a time (channels-last: about 1.3x at 224 px); smaller ones
    much faster as one grouped convolution over the batch (about 4x at 98 px, 10x at 32 px; per-call overhead)."""
    return images.device.type == "cpu" and images.shape[-2] * images.shape[-1] > 128 * 128


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor, kernel_size: int = BLUR_KERNEL_SIZE) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image, reflect padding (torchvision's kernel)."""
    batch, channels, height, width = images.shape
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size, device=images.device, dtype=images.dtype)
    kernels = torch.exp(-0.5 * (x.view(1, -1) / sigmas.view(-1, 1).to(images.dtype)) ** 2)
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # (B*C, k)
    pad = kernel_size // 2
    if _blur_one_image_at_a_time(images):
        # One depthwise convolution per image in channels-last layout (the same sums as the grouped one below).
        padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
        out = torch.empty_like(images)
        for i in range(batch):
            kernel = kernels[i * channels : (i + 1) * channels]
            row = F.conv2d(padded[i : i + 1].contiguous(memory_format=torch.channels_last), kernel.view(-1, 1, 1, kernel_size), groups=channels)
            out[i : i + 1] = F.conv2d(row, kernel.view(-1, 1, kernel_size, 1), groups=channels)
        return out
    flat = F.pad(images.reshape(1, batch * channels, height, width), (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, kernels.view(-1, 1, 1, kernel_size), groups=batch * channels)
    flat = F.conv2d(flat, kernels.view(-1, 1, kernel_size, 1), groups=batch * channels)
    return flat.view(batch, channels, height, width)


def solarize(images: torch.Tensor, threshold: float = 128 / 255) -> torch.Tensor:
    """Invert pixels at or above ``threshold`` (PIL's ImageOps.solarize(image, 128) on uint8 images)."""
    return torch.where(images >= threshold, 1.0 - images, images)


class BatchedPhotometric:
    """DINOv2's photometric augmentations on uint8 crop batches, on any device.

    Call with the collated ``(2B, 3, H, W)`` global crops (crop 1 of every image, then crop 2) or
    the ``(n_local * B, 3, h, w)`` local crops; returns normalised float32 tensors.
    """

    def __init__(
        self,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        color_jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        solarize_prob: float = 0.2,
        blur: str = "intended",
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        blur_scale: float = 1.0,
    ) -> None:
        if blur not in BLUR_PROBABILITIES:
            raise ValueError(
                f"blur={blur!r}: choose 'intended' (paper: 1.0/0.1/0.5), 'official' (code: 0.0/0.9/0.5) or 'none'."
            )
        if blur_scale <= 0:
            raise ValueError(f"blur_scale={blur_scale} must be positive.")
        # Blur is defined in pixels of 224-px crops; ``blur_scale`` (crop size / 224) keeps its reach the same
        # fraction of a smaller crop (at 32 px the official sigma of up to 2 px blurs a crop into a blob).
        self.blur_kernel_size = BLUR_KERNEL_SIZE if blur_scale == 1.0 else blur_kernel_size(blur_scale)
        self.blur_sigma = tuple(sigma * blur_scale for sigma in BLUR_SIGMA)
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.color_jitter_prob, self.grayscale_prob, self.solarize_prob = color_jitter_prob, grayscale_prob, solarize_prob
        self.blur_global1, self.blur_global2, self.blur_local = BLUR_PROBABILITIES[blur]
        self.mean, self.std = mean, std

    @classmethod
    def for_crops(cls, global_crops_size: int, blur: str = "intended", blur_reference_size: int = 0) -> BatchedPhotometric:
        """The recipe's augmentation: ``blur_reference_size`` > 0 scales the blur by ``global_crops_size /
        blur_reference_size`` (224 for the official parameters); 0 keeps the official 224-px blur at any size."""
        scale = global_crops_size / blur_reference_size if blur_reference_size else 1.0
        return cls(blur=blur, blur_scale=scale)

    def _uniform(self, n: int, low: float, high: float, device, generator) -> torch.Tensor:
        return torch.rand(n, device=device, generator=generator) * (high - low) + low

    def color_jitter(
        self, images: torch.Tensor, generator: torch.Generator | None = None, grouped: bool | None = None
    ) -> torch.Tensor:
        """torchvision ColorJitter on a random subset (p), each image with its own factors and order (in place).

        ``grouped`` (default: on CPU) runs the images of each order together, else one step at a time: the same
        random draws and results either way."""
        n, device = images.shape[0], images.device
        selected = (torch.rand(n, device=device, generator=generator) < self.color_jitter_prob).nonzero().flatten()
        if selected.numel() == 0:
            return images
        k = selected.numel()
        factors = {
            0: self._uniform(k, 1 - self.brightness, 1 + self.brightness, device, generator),
            1: self._uniform(k, 1 - self.contrast, 1 + self.contrast, device, generator),
            2: self._uniform(k, 1 - self.saturation, 1 + self.saturation, device, generator),
            3: self._uniform(k, -self.hue, self.hue, device, generator),
        }
        operations = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        # One random order per image (torchvision draws one per call): at each of the 4 steps, every
        # operation runs once, on the images whose order puts it at that step.
        orders = torch.argsort(torch.rand(k, 4, device=device, generator=generator), dim=1)
        if grouped if grouped is not None else device.type == "cpu":
            # The images of each order (at most 24) gathered once and run through their 4 steps: the same
            # results with a quarter of the copies (the step-wise loop below launches fewer kernels on an accelerator).
            codes = orders[:, 0] * 64 + orders[:, 1] * 16 + orders[:, 2] * 4 + orders[:, 3]
            for code in torch.unique(codes).tolist():
                members = (codes == code).nonzero().flatten()
                rows = selected[members]
                group = images.index_select(0, rows)
                for op in orders[members[0]].tolist():
                    group = operations[op](group, factors[op][members])
                images.index_copy_(0, rows, group)
            return images
        jittered = images[selected]
        for step in range(4):
            for op, operation in enumerate(operations):
                members = (orders[:, step] == op).nonzero().flatten()
                if members.numel():
                    jittered[members] = operation(jittered[members], factors[op][members])
        images[selected] = jittered
        return images

    def random_grayscale(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        chosen = (torch.rand(images.shape[0], device=images.device, generator=generator) < self.grayscale_prob).nonzero().flatten()
        if chosen.numel():
            images[chosen] = _grayscale(images[chosen]).expand(-1, 3, -1, -1)
        return images

    def random_blur(self, images: torch.Tensor, probability: float, generator: torch.Generator | None = None) -> torch.Tensor:
        if probability <= 0:
            return images
        n = images.shape[0]
        selected = (torch.rand(n, device=images.device, generator=generator) < probability).nonzero().flatten()
        if selected.numel() == 0:
            return images
        sigmas = self._uniform(selected.numel(), *self.blur_sigma, images.device, generator)
        if _blur_one_image_at_a_time(images):
            # In place: no gathered copy of the batch (fresh large buffers cost page faults).
            for index, sigma in zip(selected.tolist(), sigmas.split(1)):
                images[index] = gaussian_blur(images[index : index + 1], sigma, self.blur_kernel_size)[0]
            return images
        images[selected] = gaussian_blur(images[selected], sigmas, self.blur_kernel_size)
        return images

    def random_solarize(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        chosen = (torch.rand(images.shape[0], device=images.device, generator=generator) < self.solarize_prob).nonzero().flatten()
        if chosen.numel():
            images[chosen] = solarize(images[chosen])
        return images

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        # (x - mean) / std as one multiply-add pass, x / std - mean / std
        scale = torch.tensor([1 / s for s in self.std], device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std)], device=images.device, dtype=images.dtype)
        return torch.addcmul(shift.view(1, -1, 1, 1), images, scale, out=images)

    def _common(self, crops: torch.Tensor, generator) -> torch.Tensor:
        # A fresh float copy that the steps below may modify in place.
        images = torch.div(crops, 255) if crops.dtype == torch.uint8 else crops.float().clone()  # uint8 / 255: one pass
        return self.random_grayscale(self.color_jitter(images, generator), generator)

    def global_crops(self, crops: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``crops``: (2B, 3, H, W), first half = global crop 1 of each image, second half = crop 2."""
        if crops.shape[0] % 2:
            raise ValueError(f"global crops must hold 2 crops per image (crop 1s then crop 2s), got {crops.shape[0]} rows.")
        images = self._common(crops, generator)
        half = images.shape[0] // 2
        # The steps work in place, here on views of the two halves.
        self.random_blur(images[:half], self.blur_global1, generator)
        self.random_solarize(self.random_blur(images[half:], self.blur_global2, generator), generator)
        return self.normalize(images)

    def local_crops(self, crops: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        images = self._common(crops, generator)
        return self.normalize(self.random_blur(images, self.blur_local, generator))
