"""Stage 4a: hierarchical k-means with resampling (Vo et al., 2024, "Automatic data curation for
self-supervised learning: a clustering-based approach"; facebookresearch/ssl-data-curation).

Level 1 clusters the images; level l+1 clusters the centroids of level l. Plain k-means on
long-tailed data spends its centroids on the dense head of the distribution; each resampling step
re-runs k-means on only the ``r`` points nearest to each current centroid, which weighs every
cluster equally, so the centroids spread out over the concepts. All points are then reassigned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import faiss
import numpy as np
from sklearn.cluster import kmeans_plusplus
from tqdm.auto import tqdm


def first_per_group(groups: np.ndarray, order_key: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Indices of the first ``counts[g]`` members of each group ``g``, members ordered by ``order_key``."""
    order = np.lexsort((order_key, groups))
    sorted_groups = groups[order]
    starts = np.searchsorted(sorted_groups, sorted_groups, side="left")  # start of each member's group
    rank = np.arange(len(order)) - starts
    return order[rank < counts[sorted_groups]]


def assign(points: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (L2) of each point, and the squared distance to it."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    distances, labels = index.search(np.ascontiguousarray(points, dtype=np.float32), 1)
    return labels[:, 0].astype(np.int64), distances[:, 0]


def kmeans(points: np.ndarray, k: int, iterations: int, seed: int, init: np.ndarray | None = None,
           max_points_per_centroid: int = 256) -> np.ndarray:
    """faiss k-means centroids (L2), started from ``init``, else from k-means++ seeds (as ssl-data-curation).

    k-means++ (scikit-learn's) spreads the initial centroids over the data; faiss's default random
    init draws them where the data is dense, which leaves small, far concepts without a cluster.
    Seeding runs on a seeded subsample of 8 points per cluster; training on at most
    ``max_points_per_centroid`` points per cluster (faiss subsamples).
    """
    points = np.ascontiguousarray(points, dtype=np.float32)
    if init is None and k > 1:
        rng = np.random.default_rng(seed)
        # 8 points per cluster: enough for the seeds to reach every region; k-means++ costs O(n k d).
        subset = points if len(points) <= 8 * k else points[rng.choice(len(points), 8 * k, replace=False)]
        init = kmeans_plusplus(subset, k, random_state=seed, n_local_trials=1)[0]
    clustering = faiss.Kmeans(
        points.shape[1], k, niter=iterations, seed=seed, verbose=False,
        max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1,
    )
    clustering.train(points, init_centroids=None if init is None else np.ascontiguousarray(init, dtype=np.float32))
    return clustering.centroids.copy()


def kmeans_with_resampling(points: np.ndarray, k: int, steps: int, sample_size: int, iterations: int = 20,
                           seed: int = 0, max_points_per_centroid: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One level: k-means, then ``steps`` resampling steps; (centroids, labels, squared distances).

    Empty clusters are dropped, so every returned centroid has at least one point.
    """
    k = min(k, len(points))
    centroids = kmeans(points, k, iterations, seed, max_points_per_centroid=max_points_per_centroid)
    labels, distances = assign(points, centroids)
    if sample_size > 1:  # with one point per cluster, a resampling step would only move centroids onto points
        for step in range(steps):
            picked = first_per_group(labels, distances, np.full(k, sample_size))
            # A fresh k-means on the picked points, as in ssl-data-curation: they hold (about) as many
            # points per cluster, so dense regions no longer attract the centroids. Starting from the
            # current centroids instead would be a fixed point (the r closest points average to them).
            centroids = kmeans(points[picked], min(k, len(picked)), iterations, seed + 1 + step,
                               max_points_per_centroid=max_points_per_centroid)
            labels, distances = assign(points, centroids)
    used = np.unique(labels)
    remap = np.full(len(centroids), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return centroids[used], remap[labels], distances


@dataclass
class ClusterTree:
    """``parents[0][i]``: level-1 cluster of point i; ``parents[l][c]``: level-(l+2) cluster of level-(l+1) cluster c."""

    parents: list[np.ndarray]
    centroids: list[np.ndarray]
    distances: np.ndarray  # squared distance of each point to its level-1 centroid
    sizes: list[np.ndarray] = field(default_factory=list)  # points under each cluster, per level

    def __post_init__(self) -> None:
        if not self.sizes:
            sizes, counts = [], np.ones(len(self.parents[0]), dtype=np.int64)
            for parents, centroids in zip(self.parents, self.centroids):
                counts = np.bincount(parents, weights=counts, minlength=len(centroids)).astype(np.int64)
                sizes.append(counts)
            self.sizes = sizes

    @property
    def levels(self) -> int:
        return len(self.parents)

    def point_labels(self, level: int) -> np.ndarray:
        """Cluster of each point at ``level`` (1 = finest)."""
        labels = self.parents[0]
        for parents in self.parents[1:level]:
            labels = parents[labels]
        return labels

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"distances": self.distances}
        for level, (parents, centroids) in enumerate(zip(self.parents, self.centroids)):
            arrays[f"parents_{level}"], arrays[f"centroids_{level}"] = parents, centroids
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ClusterTree:
        levels = sum(1 for name in arrays if name.startswith("parents_"))
        return cls(
            parents=[arrays[f"parents_{level}"] for level in range(levels)],
            centroids=[arrays[f"centroids_{level}"] for level in range(levels)],
            distances=arrays["distances"],
        )


def hierarchical_kmeans(points: np.ndarray, levels: list[int], resampling_steps: list[int], sample_sizes: list[int],
                        iterations: int = 20, seed: int = 0, max_points_per_centroid: int = 256) -> ClusterTree:
    """Cluster ``points`` into ``levels[0]`` clusters, their centroids into ``levels[1]``, and so on."""
    parents, centroids, distances, current = [], [], None, points
    for level, (k, steps, size) in enumerate(tqdm(list(zip(levels, resampling_steps, sample_sizes)), desc="k-means levels")):
        level_centroids, labels, level_distances = kmeans_with_resampling(
            current, k, steps, size, iterations, seed + 1000 * level, max_points_per_centroid
        )
        if level == 0:
            distances = level_distances
        parents.append(labels)
        centroids.append(level_centroids)
        current = level_centroids
    return ClusterTree(parents=parents, centroids=centroids, distances=distances)
