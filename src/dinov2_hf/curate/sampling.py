"""Stage 4b: balanced top-down sampling from a :class:`ClusterTree` (Vo et al., 2024).

The target count is split as evenly as possible among the top-level clusters; a cluster smaller
than its share gives all its points and its leftover budget goes to the others. The same split is
repeated inside each cluster, level by level, down to the leaves, where points are taken nearest
to the centroid first or at random. Small concepts thus keep their images while big ones are thinned.
"""

from __future__ import annotations

import numpy as np

from .kmeans import ClusterTree, first_per_group


def split_evenly(sizes: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Counts ``c <= sizes`` summing to ``min(target, sizes.sum())``, as equal as the sizes allow.

    The largest cap ``x`` with ``sum(min(sizes, x)) <= target`` is found by bisection; the remainder
    (fewer than the clusters above the cap) adds one to randomly chosen clusters above the cap.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if target >= sizes.sum():
        return sizes.copy()
    low, high = 0, int(sizes.max())  # sum(min(sizes, low)) <= target < sum(min(sizes, high))
    while high - low > 1:
        middle = (low + high) // 2
        if np.minimum(sizes, middle).sum() <= target:
            low = middle
        else:
            high = middle
    counts = np.minimum(sizes, low)
    remainder = int(target - counts.sum())
    if remainder:
        counts[rng.choice(np.flatnonzero(sizes > low), remainder, replace=False)] += 1
    return counts


def balanced_sample(tree: ClusterTree, target: int, strategy: str = "random", seed: int = 0) -> np.ndarray:
    """Sorted indices of ``target`` points (all of them when fewer), balanced top-down over the tree."""
    rng = np.random.default_rng(seed)
    top = tree.levels - 1
    counts = split_evenly(tree.sizes[top], target, rng)
    for level in range(top, 0, -1):  # split each cluster's count among its children (clusters of level below)
        children_of = tree.parents[level]
        child_counts = np.zeros(len(children_of), dtype=np.int64)
        order = np.argsort(children_of, kind="stable")
        bounds = np.searchsorted(children_of[order], np.arange(len(counts) + 1))
        for parent in np.flatnonzero(counts):
            children = order[bounds[parent] : bounds[parent + 1]]
            child_counts[children] = split_evenly(tree.sizes[level - 1][children], int(counts[parent]), rng)
        counts = child_counts
    leaves = tree.parents[0]
    if strategy == "closest":
        key = tree.distances
    elif strategy == "random":
        key = rng.random(len(leaves))
    else:
        raise ValueError(f"sample.strategy={strategy!r} is not one of ['closest', 'random'].")
    return np.sort(first_per_group(leaves, key, counts))
