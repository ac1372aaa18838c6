"""Retrieval returns the true nearest neighbours (numpy brute force), flat and IVF."""

import faiss
import numpy as np
import pytest

from dinov2_hf.curate.config import IndexSettings
from dinov2_hf.curate.retrieve import Retrieval, retrieve

faiss.omp_set_num_threads(2)


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(50, dim))
    vectors = centers[rng.integers(0, 50, n)] + 0.5 * rng.normal(size=(n, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def brute_force(pool: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    similarities = queries.astype(np.float64) @ pool.T.astype(np.float64)
    ids = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(similarities, ids, axis=1), ids


@pytest.mark.parametrize("settings", [IndexSettings(kind="flat"), IndexSettings(kind="ivf", nlist=32, nprobe=32)],
                         ids=["flat", "ivf-all-lists"])
def test_retrieval_is_exact_nearest_neighbours(settings):
    pool, queries = clustered(3000, 32, 0), clustered(200, 32, 1)
    found = retrieve(pool, queries, 10, settings)
    expected_similarities, expected_ids = brute_force(pool, queries, 10)
    np.testing.assert_allclose(found.similarities, expected_similarities, atol=1e-5)
    # Ids agree except where two pool images tie within float32 rounding.
    tied = np.abs(np.diff(expected_similarities, axis=1)) < 1e-5
    differ = found.neighbours != expected_ids
    assert np.all(~differ | np.pad(tied, ((0, 0), (1, 0))) | np.pad(tied, ((0, 0), (0, 1))))


def test_ivf_default_probe_recall():
    vectors = clustered(20300, 32, 2)  # queries from the pool's distribution
    pool, queries = vectors[:20000], vectors[20000:]
    found = retrieve(pool, queries, 10, IndexSettings(kind="ivf"))  # auto nlist ~ 4 sqrt(n) = 565, nprobe 16
    _, expected = brute_force(pool, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.neighbours.tolist(), expected.tolist())])
    print(f"\nIVF recall@10 with nprobe 16: {recall:.3f}")
    assert recall >= 0.9


def test_selected_merges_queries_and_keeps_best_match():
    retrieval = Retrieval(similarities=np.array([[0.9, 0.5], [0.8, 0.7]], np.float32),
                          neighbours=np.array([[4, 2], [2, -1]]))
    rows, queries, similarities = retrieval.selected()
    assert rows.tolist() == [2, 4] and queries.tolist() == [1, 0]
    np.testing.assert_allclose(similarities, [0.8, 0.9])
