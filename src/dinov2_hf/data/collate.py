"""Collate multi-crop samples into the batch the DINOv2 meta-architecture consumes."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .masking import MaskingGenerator, stratified_masks


@dataclass
class MultiCropCollator:
    """Stack crops and draw iBOT masks, like the official ``collate_data_and_cast``.

    Crops are stacked crop-major: all images' global crop 1, then all images' crop 2 (the teacher
    splits them with ``chunk(2)``); likewise for local crops. Masks cover the global crops' patch
    grid; ``mask_probability`` of them are masked with stratified ratios.

    Returns a dict with ``global_crops`` (2B, 3, H, W), ``local_crops`` (n_local B, 3, h, w),
    ``masks`` (2B, N) bool, ``mask_indices`` (flat indices of masked patches), ``masks_weight``
    (1 / masked patches of the patch's image, per masked patch), ``n_masked_patches`` (1,) and
    ``upperbound`` (an upper bound on masked patches, for fixed-size buffers).
    """

    global_crops_size: int = 224
    patch_size: int = 14
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    mask_probability: float = 0.5
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.global_crops_size % self.patch_size:
            raise ValueError(
                f"global_crops_size={self.global_crops_size} is not a multiple of patch_size={self.patch_size}."
            )
        grid = self.global_crops_size // self.patch_size
        self.rng = random.Random(self.seed)
        self.mask_generator = MaskingGenerator((grid, grid), max_num_patches=int(0.5 * grid * grid), rng=self.rng)

    def __call__(self, samples: list[dict]) -> dict:
        batch = self.stack(samples)
        batch.update(self.masks(self.global_crop_count(batch)))
        return batch

    @staticmethod
    def global_crop_count(batch: dict) -> int:
        """Global crops in a stacked batch: cut already, or two per image still to cut (``crops.resize=device``)."""
        return len(batch["global_crops"]) if "global_crops" in batch else 2 * len(batch["images"])

    @staticmethod
    def stack(samples: list[dict]) -> dict:
        """Crops (crop-major), labels, skipped-image counts and stream positions (``worker``, ``rows``); no masks.

        Samples of ``crops.resize=device`` give ``images`` (B, 3, H, W) and ``crop_boxes`` (B, n, 6) instead of
        crops (:func:`~dinov2_hf.data.transforms.crops_from_boxes` cuts them on the device)."""
        if not samples:
            raise ValueError("Cannot collate an empty batch.")
        if "image" in samples[0]:
            shapes = {tuple(s["image"].shape[1:]) for s in samples}
            if len(shapes) > 1:
                raise ValueError(
                    f"crops.resize=device stacks the decoded images, which must all have one size; this batch has "
                    f"{sorted(shapes)} (height, width). Use crops.resize=torch (or pil) for images of mixed sizes."
                )
            batch = {"images": torch.stack([s["image"] for s in samples]), "crop_boxes": torch.stack([s["crop_boxes"] for s in samples])}
        else:
            n_global, n_local = len(samples[0]["global_crops"]), len(samples[0]["local_crops"])
            global_crops = torch.stack([s["global_crops"][i] for i in range(n_global) for s in samples])
            local_crops = (
                torch.stack([s["local_crops"][i] for i in range(n_local) for s in samples]) if n_local else global_crops[:0]
            )
            batch = {"global_crops": global_crops, "local_crops": local_crops}
        for key in ("labels", "skipped", "worker", "rows"):
            if key in samples[0]:
                batch[key] = torch.tensor([s[key] for s in samples])
        return batch

    def masks(self, n_global_crops: int, rng: random.Random | None = None) -> dict:
        """iBOT masks for ``n_global_crops`` crops (from ``rng`` if given, e.g. seeded per step)."""
        masks, upperbound = stratified_masks(
            n_global_crops, self.mask_generator, self.mask_ratio_min_max, self.mask_probability, rng or self.rng
        )
        return self.mask_batch(torch.from_numpy(masks), upperbound)

    @staticmethod
    def mask_batch(masks: torch.Tensor, upperbound: int) -> dict:
        """The batch entries derived from boolean ``masks`` (n_global_crops, N)."""
        mask_indices = masks.flatten().nonzero().flatten()
        return {
            "masks": masks,
            "mask_indices": mask_indices,
            "masks_weight": (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks],
            "n_masked_patches": torch.tensor([mask_indices.numel()], dtype=torch.long),
            "upperbound": upperbound,
        }
