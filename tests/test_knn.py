"""Weighted kNN against an independent brute-force reference."""

import numpy as np
import pytest
import torch

from dinov2_hf.eval import knn_classify


def reference_knn(train, train_labels, test, k, temperature, num_classes):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    predictions = []
    for row in test:
        row = row / np.linalg.norm(row)
        similarity = train @ row
        nearest = np.argsort(-similarity, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for i in nearest:
            votes[train_labels[i]] += np.exp(similarity[i] / temperature)
        predictions.append(int(np.argmax(votes)))
    return np.array(predictions)


def test_matches_reference_on_random_features():
    rng = np.random.RandomState(0)
    centers = rng.randn(5, 16) * 2
    train_labels = rng.randint(0, 5, 300)
    test_labels = rng.randint(0, 5, 120)
    train = centers[train_labels] + rng.randn(300, 16) * 2
    test = centers[test_labels] + rng.randn(120, 16) * 2
    result = knn_classify(torch.tensor(train), torch.tensor(train_labels), torch.tensor(test), torch.tensor(test_labels),
                          ks=(1, 10, 20), chunk_size=50)
    for k in (1, 10, 20):
        expected = (reference_knn(train, train_labels, test, k, 0.07, 5) == test_labels).mean()
        assert result[k] == pytest.approx(expected)
    assert 0.3 < result[20] < 1.0  # clustered data: well above chance (0.2)


def test_hand_checked_votes():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.05]])
    # k=1: the nearest is class 0; k=3: class 1 has two votes but the far one weighs exp(~0)
    assert knn_classify(train, labels, test, torch.tensor([0]), ks=(1,))[1] == 1.0
    assert knn_classify(train, labels, test, torch.tensor([1]), ks=(3,), temperature=10.0)[3] == 1.0


def test_bad_shapes():
    with pytest.raises(ValueError, match="same dim"):
        knn_classify(torch.zeros(4, 3), torch.zeros(4), torch.zeros(2, 5), torch.zeros(2))
    with pytest.raises(ValueError, match="one label per row"):
        knn_classify(torch.zeros(4, 3), torch.zeros(3), torch.zeros(2, 3), torch.zeros(2))
