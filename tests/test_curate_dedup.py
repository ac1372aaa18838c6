"""Deduplication: planted exact and augmented copies in CIFAR-10, brute-force pairs, eval-set leakage."""

import io
import random

import faiss
import numpy as np
from curate_helpers import ThumbnailEmbedder, augmented_copy, cifar_rows, write_images
from PIL import Image

from dinov2_hf.curate.config import DedupSettings, IndexSettings, SourceSettings
from dinov2_hf.curate.dedup import components, deduplicate, near_duplicate_pairs
from dinov2_hf.curate.embed import embed_source

faiss.omp_set_num_threads(2)


def precision_recall(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    hits = (predicted & truth).sum()
    return hits / max(predicted.sum(), 1), hits / max(truth.sum(), 1)


def test_dedup_finds_planted_exact_and_augmented_copies(cifar_dir, tmp_path):
    originals = [r["image"]["bytes"] for r in cifar_rows(cifar_dir, "test", 0, 800)]
    rng = random.Random(0)
    near_sources = rng.sample(range(800), 150)
    exact_sources = rng.sample(range(800), 30)
    images = originals + [augmented_copy(originals[i], rng) for i in near_sources] + [originals[i] for i in exact_sources]
    group = np.array(list(range(800)) + near_sources + exact_sources)  # planted group of every image
    order = np.random.default_rng(0).permutation(len(images))  # copies must not simply follow their originals
    images, group = [images[i] for i in order], group[order]
    write_images(tmp_path / "pool.parquet", images)

    embedder = ThumbnailEmbedder([r["image"]["bytes"] for r in cifar_rows(cifar_dir, "train", 0, 2000)])
    pool = embed_source(SourceSettings(source=str(tmp_path / "pool.parquet")), embedder, tmp_path / "emb",
                        embedder.signature, shard_size=512, batch_size=256)
    result = deduplicate(pool.vectors, pool.hashes, DedupSettings())  # the default threshold

    # Image level: dedup "finds" an image when it puts it in a group of two or more (kept or removed).
    rows_group = group[pool.positions]
    found = np.bincount(result.groups, minlength=len(images))[result.groups] >= 2
    planted = np.bincount(group)[rows_group] >= 2
    precision, recall = precision_recall(found, planted)
    print(f"\nplanted: {planted.sum()} images in {np.sum(np.bincount(group) >= 2)} groups; removed: exact {result.exact}, "
          f"near {result.near} (ideal {len(images) - len(set(group.tolist()))}); precision {precision:.3f}, recall {recall:.3f}")
    assert result.exact == 30  # byte-identical copies, found by hash alone
    assert precision >= 0.9 and recall >= 0.9


def brute_force_pairs(vectors: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    similarities = vectors.astype(np.float64) @ vectors.T.astype(np.float64)
    i, j = np.nonzero(np.triu(similarities >= threshold, k=1))
    return set(zip(i.tolist(), j.tolist()))


def test_near_duplicate_pairs_equal_numpy_brute_force():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(300, 16))
    copies = base[rng.choice(300, 60)] + rng.normal(scale=rng.uniform(0.05, 0.6, size=(60, 1)), size=(60, 16))
    vectors = np.concatenate([base, copies]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for threshold in (0.8, 0.9, 0.97):
        pairs, similarities = near_duplicate_pairs(vectors, threshold, k=len(vectors))
        expected = brute_force_pairs(vectors, threshold)
        assert len(expected) > 10
        # Scores on the threshold itself may round either way in float32: compare away from it.
        found = set(map(tuple, pairs.tolist()))
        exact = vectors.astype(np.float64) @ vectors.T.astype(np.float64)
        clear = {p for p in expected | found if abs(exact[p] - threshold) > 1e-5}
        assert found & clear == expected & clear
        assert np.all(similarities >= threshold)


def test_components_keep_one_image_per_connected_group():
    pairs = np.array([[0, 3], [3, 5], [1, 2]])
    labels = components(7, pairs)
    assert labels[0] == labels[3] == labels[5] and labels[1] == labels[2]
    assert len({labels[0], labels[1], labels[4], labels[6]}) == 4
    vectors = np.eye(7, dtype=np.float32)  # no near duplicates: only the hashes group rows
    hashes = np.zeros((7, 16), np.uint8)
    hashes[:, 0] = [0, 1, 2, 0, 3, 0, 1]
    result = deduplicate(vectors, hashes, DedupSettings())
    assert result.keep.tolist() == [True, True, True, False, True, False, False] and result.exact == 3


def test_pool_copies_of_eval_images_are_removed(cifar_dir, tmp_path):
    rows = cifar_rows(cifar_dir, "test", 2000, 500)
    evaluation = [r["image"]["bytes"] for r in rows[:200]]
    unrelated = [r["image"]["bytes"] for r in rows[200:]]
    rng = random.Random(1)
    leaked = rng.sample(range(200), 40)
    pool_images = unrelated + [augmented_copy(evaluation[i], rng) for i in leaked[:30]] + [evaluation[i] for i in leaked[30:]]
    embedder = ThumbnailEmbedder([r["image"]["bytes"] for r in cifar_rows(cifar_dir, "train", 0, 2000)])
    to_array = lambda images: embedder([Image.open(io.BytesIO(b)) for b in images])  # noqa: E731
    hashes = lambda images: np.stack([np.frombuffer(__import__("hashlib").blake2b(b, digest_size=16).digest(), np.uint8) for b in images])  # noqa: E731
    settings = DedupSettings(exact=False, near=False)
    result = deduplicate(to_array(pool_images), hashes(pool_images), settings, to_array(evaluation), hashes(evaluation))
    is_copy = np.arange(len(pool_images)) >= len(unrelated)
    precision, recall = precision_recall(~result.keep, is_copy)
    print(f"\nleakage: removed {result.leaked} of {len(pool_images)} (40 planted): precision {precision:.3f}, recall {recall:.3f}")
    assert result.leaked == (~result.keep).sum()
    assert not result.keep[-10:].any()  # byte-identical copies always go
    assert precision >= 0.9 and recall >= 0.9


def test_clustered_self_join_of_a_large_pool_matches_brute_force():
    """Above 20k rows the join visits each row's nearest lists only: all lists give the exact pairs,
    the default 4 nearly all (copies sit in their original's list or the next ones)."""
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(40, 16))
    base = centers[rng.integers(0, 40, 20500)] + 0.8 * rng.normal(size=(20500, 16))
    copies = base[rng.choice(20500, 800)] + 0.08 * rng.normal(size=(800, 16))
    vectors = np.concatenate([base, copies]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    expected = set()
    for start in range(0, len(vectors), 2000):
        block = vectors[start : start + 2000] @ vectors.T
        i, j = np.nonzero(block >= 0.95)
        expected |= {(a + start, b) for a, b in zip(i.tolist(), j.tolist()) if a + start < b}
    index = IndexSettings(nlist=64)
    every_list, _ = near_duplicate_pairs(vectors, 0.95, k=1000, index=index, nprobe=64)
    default, _ = near_duplicate_pairs(vectors, 0.95, index=index)
    found = set(map(tuple, default.tolist()))
    print(f"\nclustered join: {len(expected)} pairs >= 0.95; default nprobe finds {len(found & expected)}, "
          f"all lists {len(every_list)}")
    assert len(expected) > 700
    assert set(map(tuple, every_list.tolist())) == expected
    assert found <= expected and len(found) >= 0.95 * len(expected)
