"""Hierarchical k-means with resampling and balanced sampling: hand-checked splits, flattening of
long-tailed data against random sampling, determinism."""

import io

import faiss
import numpy as np
import pytest
from curate_helpers import ThumbnailEmbedder, cifar_rows
from PIL import Image

from dinov2_hf.curate.kmeans import hierarchical_kmeans, kmeans_with_resampling
from dinov2_hf.curate.sampling import balanced_sample, split_evenly

faiss.omp_set_num_threads(2)


@pytest.mark.parametrize("sizes, target, expected", [
    ([1, 5, 10, 100], 30, [1, 5, 10, 14]),  # small clusters give all; the leftover goes to the big one
    ([4, 4, 4], 12, [4, 4, 4]),
    ([4, 4, 4], 50, [4, 4, 4]),  # more wanted than there is: everything
    ([0, 7, 3], 6, [0, 3, 3]),
    ([10, 10], 0, [0, 0]),
])
def test_split_evenly_hand_checked(sizes, target, expected):
    assert split_evenly(np.array(sizes), target, np.random.default_rng(0)).tolist() == expected


def test_split_evenly_remainder_is_spread_one_each():
    counts = split_evenly(np.array([2, 9, 9, 9, 9]), 20, np.random.default_rng(0))
    assert counts.sum() == 20 and counts[0] == 2
    assert sorted(counts[1:].tolist()) == [4, 4, 5, 5]


def long_tailed_mixture(seed: int = 0, concepts: int = 30, dim: int = 32):
    rng = np.random.default_rng(seed)
    sizes = (3000 * 0.8 ** np.arange(concepts)).astype(int) + 10  # 3010 ... 13: a long tail
    centers = rng.normal(size=(concepts, dim))
    labels = np.repeat(np.arange(concepts), sizes)
    vectors = centers[labels] + 0.25 * rng.normal(size=(len(labels), dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32), labels


def normalized_entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum() / np.log(len(counts)))


def test_balanced_sampling_flattens_a_long_tail_more_than_random():
    vectors, concepts = long_tailed_mixture()
    tree = hierarchical_kmeans(vectors, [300, 60, 20], [1, 10, 10], [1, 5, 3], seed=0)
    target = 1500
    results = {}
    for name, chosen in [("balanced", balanced_sample(tree, target, "random", seed=0)),
                         ("random", np.sort(np.random.default_rng(0).choice(len(vectors), target, replace=False)))]:
        assert len(chosen) == target and len(np.unique(chosen)) == target
        per_concept = np.bincount(concepts[chosen], minlength=concepts.max() + 1)
        per_cluster = np.bincount(tree.point_labels(2)[chosen], minlength=len(tree.centroids[1]))
        results[name] = (normalized_entropy(per_concept), per_concept.max() / max(per_concept.min(), 1),
                         normalized_entropy(per_cluster), per_cluster.std() / per_cluster.mean())
    print("\n(concept entropy, concept max/min, level-2 cluster entropy, level-2 cluster CV):",
          {k: tuple(round(float(x), 3) for x in v) for k, v in results.items()},
          "| data:", round(normalized_entropy(np.bincount(concepts)), 3))
    balanced, uniform = results["balanced"], results["random"]
    assert balanced[0] > uniform[0] + 0.1  # the 30 true concepts are much more evenly represented
    assert balanced[1] < uniform[1] / 3
    assert balanced[2] > uniform[2] and balanced[3] < 0.8 * uniform[3]


def test_balanced_sampling_flattens_a_long_tailed_cifar_subset(cifar_dir):
    """Long-tailed CIFAR-10 (class c keeps 400 * 0.6^c images): clusters of the selection vs random."""
    rows = cifar_rows(cifar_dir, "train", 0, 6000)
    keep = {c: int(400 * 0.6**c) + 5 for c in range(10)}
    subset = []
    for row in rows:
        if keep[row["label"]] > 0:
            keep[row["label"]] -= 1
            subset.append(row)
    embedder = ThumbnailEmbedder([r["image"]["bytes"] for r in cifar_rows(cifar_dir, "test", 0, 2000)])
    vectors = embedder([Image.open(io.BytesIO(r["image"]["bytes"])) for r in subset])
    tree = hierarchical_kmeans(vectors, [100, 20, 5], [1, 5, 5], [1, 4, 3], seed=0)
    target = len(subset) // 4
    flatness = {}  # per level: (normalized entropy, coefficient of variation) of the selection's cluster sizes
    for name, chosen in [("balanced", balanced_sample(tree, target, "closest", seed=0)),
                         ("random", np.random.default_rng(0).choice(len(vectors), target, replace=False))]:
        flatness[name] = []
        for level in (1, 2, 3):
            per_cluster = np.bincount(tree.point_labels(level)[chosen], minlength=len(tree.centroids[level - 1]))
            flatness[name].append((round(normalized_entropy(per_cluster), 3), round(float(per_cluster.std() / per_cluster.mean()), 3)))
    print(f"\nCIFAR long tail ({len(subset)} images, {target} chosen), levels 1-3 (entropy, CV): {flatness}")
    # The top-down split evens out the upper levels; leaves only get shares. (How much flatter than random each
    # level gets depends on the k-means result, which differs between faiss/numpy/Pillow versions: under 0.75x the random
    # CV at the top level with an earlier set, 0.87x with the current one; the direction does not.)
    (_, _), (entropy_2, cv_2), (entropy_3, cv_3) = flatness["balanced"]
    (_, _), (random_entropy_2, random_cv_2), (random_entropy_3, random_cv_3) = flatness["random"]
    assert entropy_3 > random_entropy_3 and cv_3 < random_cv_3
    assert entropy_2 > random_entropy_2 and cv_2 < random_cv_2


def test_resampling_spreads_centroids_over_the_tail():
    """Vo et al.: plain k-means crowds centroids into the dense head; resampling moves them to the tail."""
    vectors, concepts = long_tailed_mixture(seed=1)
    _, plain, _ = kmeans_with_resampling(vectors, 30, steps=0, sample_size=1, seed=0)
    _, resampled, _ = kmeans_with_resampling(vectors, 30, steps=10, sample_size=20, seed=0)

    def covered(labels):  # concepts that are the majority of at least one cluster
        return len({np.bincount(concepts[labels == c]).argmax() for c in np.unique(labels)})

    print(f"\nconcepts covered by 30 clusters: plain {covered(plain)}, resampled {covered(resampled)} of 30")
    assert covered(resampled) > covered(plain)


def test_tree_and_sampling_are_seeded_and_consistent():
    vectors, _ = long_tailed_mixture(seed=2, concepts=10)
    first = hierarchical_kmeans(vectors, [50, 10, 3], [1, 3, 3], [1, 4, 2], seed=5)
    second = hierarchical_kmeans(vectors, [50, 10, 3], [1, 3, 3], [1, 4, 2], seed=5)
    for a, b in zip(first.parents, second.parents):
        np.testing.assert_array_equal(a, b)
    for level, sizes in enumerate(first.sizes):
        assert sizes.sum() == len(vectors) and sizes.min() >= 1  # no empty cluster survives
        assert first.parents[level].max() + 1 == len(first.centroids[level])
    closest = balanced_sample(first, 200, "closest", seed=3)
    np.testing.assert_array_equal(closest, balanced_sample(second, 200, "closest", seed=3))
    # "closest": inside each leaf the chosen points are the nearest to its centroid.
    leaves = first.parents[0]
    for leaf in np.unique(leaves[closest]):
        members = np.flatnonzero(leaves == leaf)
        chosen = np.intersect1d(members, closest)
        assert first.distances[chosen].max() <= np.sort(first.distances[members])[len(chosen) - 1] + 1e-6


def test_degenerate_data_gives_no_empty_cluster():
    """500 identical points + 20 others asked for 50 clusters: the empty ones are dropped, nothing crashes."""
    points = np.concatenate([np.ones((500, 8)), np.random.default_rng(0).normal(size=(20, 8))]).astype(np.float32)
    tree = hierarchical_kmeans(points, [50, 10, 3], [1, 3, 3], [1, 4, 2], seed=0)
    assert len(tree.centroids[0]) <= 21  # at most one cluster per distinct point
    for sizes in tree.sizes:
        assert sizes.min() >= 1 and sizes.sum() == 520
    assert len(balanced_sample(tree, 30, "closest")) == 30
