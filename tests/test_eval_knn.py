"""Chunked kNN search: the running top-k over training chunks equals one exact search (faiss, numpy)."""

import faiss
import numpy as np
import pytest
import torch
from eval_threads import single_thread  # noqa: F401  (autouse: one compute thread)
from test_knn import reference_knn

from dinov2_hf.eval.knn import knn_classify, knn_predict, topk_cosine


def test_running_topk_over_train_chunks_equals_faiss_exact_search():
    rng = np.random.RandomState(0)
    database = rng.randn(1000, 32).astype(np.float32)
    queries = rng.randn(50, 32).astype(np.float32)
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(32)
    index.add(database)
    expected_sim, expected_idx = index.search(queries, 15)
    for train_chunk_size in (1000, 97, 10):  # one chunk, uneven chunks, chunks smaller than k
        sim, idx = topk_cosine(torch.from_numpy(queries), torch.from_numpy(database), 15, train_chunk_size)
        np.testing.assert_array_equal(idx.numpy(), expected_idx)
        np.testing.assert_allclose(sim.numpy(), expected_sim, rtol=1e-5, atol=1e-6)
    # the database is normalised chunk by chunk: row scales do not matter
    scaled = torch.from_numpy(database) * (torch.rand(1000, 1) * 10 + 0.1)
    sim, idx = topk_cosine(torch.from_numpy(queries), scaled, 15, 97)
    np.testing.assert_array_equal(idx.numpy(), expected_idx)


def test_chunked_classification_matches_brute_force_reference():
    rng = np.random.RandomState(1)
    centers = rng.randn(7, 24) * 2
    train_labels, test_labels = rng.randint(0, 7, 800), rng.randint(0, 7, 90)
    train = centers[train_labels] + rng.randn(800, 24) * 2.5
    test = centers[test_labels] + rng.randn(90, 24) * 2.5
    ks = (1, 10, 20, 100)
    predictions = knn_predict(torch.tensor(train), torch.tensor(train_labels), torch.tensor(test), ks=ks,
                              chunk_size=32, train_chunk_size=64)
    for k in ks:
        np.testing.assert_array_equal(predictions[k].numpy(), reference_knn(train, train_labels, test, k, 0.07, 7))
    accuracy = knn_classify(torch.tensor(train), torch.tensor(train_labels), torch.tensor(test), torch.tensor(test_labels),
                            ks=ks, train_chunk_size=64)
    assert accuracy[20] == pytest.approx((predictions[20].numpy() == test_labels).mean())


def test_k_larger_than_training_set_is_clipped():
    train, labels = torch.randn(5, 4), torch.tensor([0, 1, 1, 1, 0])
    predictions = knn_predict(train, labels, torch.randn(3, 4), ks=(200,), train_chunk_size=2)
    assert predictions[200].shape == (3,)
    with pytest.raises(ValueError, match="empty"):
        knn_predict(torch.zeros(0, 4), torch.zeros(0), torch.randn(3, 4))
