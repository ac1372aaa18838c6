"""iBOT masks: BEiT-style block masking and the stratified ratios of the DINOv2 collate."""

from __future__ import annotations

import math
import random

import numpy as np


class MaskingGenerator:
    """Random rectangular blocks on a ``height x width`` patch grid until a target count is reached.

    Each block has an area drawn uniformly in ``[min_num_patches, remaining budget]`` and an aspect
    ratio log-uniform in ``[min_aspect, 1 / min_aspect]``; up to 10 tries per block, and a block
    must add at least one new patch without exceeding the budget (BEiT, as in DINOv2).
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        max_num_patches: int | None = None,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.height, self.width = input_size if isinstance(input_size, tuple) else (input_size, input_size)
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = self.num_patches if max_num_patches is None else max_num_patches
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
        self.rng = rng or random.Random()

    def _add_block(self, mask: np.ndarray, max_mask_patches: int, rng: random.Random | None = None) -> int:
        rng = rng or self.rng
        delta = 0
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                block = mask[top : top + h, left : left + w]
                new_patches = h * w - int(block.sum())
                if 0 < new_patches <= max_mask_patches:
                    block[...] = True
                    delta += new_patches
                if delta > 0:
                    break
        return delta

    def __call__(self, num_masking_patches: int = 0, rng: random.Random | None = None) -> np.ndarray:
        """A boolean (height, width) mask with about ``num_masking_patches`` patches set."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            delta = self._add_block(mask, budget, rng)
            if delta == 0:
                break
            count += delta
        return mask


def stratified_masks(
    n_images: int,
    generator: MaskingGenerator,
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    rng: random.Random | None = None,
) -> tuple[np.ndarray, int]:
    """Masks for ``n_images`` global crops, as the DINOv2 collate draws them.

    ``int(n_images * mask_probability)`` images are masked; their ratios are stratified: image i
    draws uniformly in the i-th of equal bins of ``linspace(min, max)``. The rest get empty masks;
    the order is shuffled. Also returns the upper bound on masked patches (sum of bin maxima).
    """
    rng = rng or generator.rng
    n_patches = generator.num_patches
    n_masked_images = int(n_images * mask_probability)
    edges = np.linspace(*mask_ratio_min_max, n_masked_images + 1)
    masks, upperbound = [], 0
    for i in range(n_masked_images):
        masks.append(generator(int(n_patches * rng.uniform(edges[i], edges[i + 1])), rng))
        upperbound += int(n_patches * edges[i + 1])
    masks += [generator(0, rng) for _ in range(n_images - n_masked_images)]
    rng.shuffle(masks)
    return np.stack(masks).reshape(n_images, -1), upperbound
