r"""Weighted k-nearest-neighbour classification on frozen features (DINO / DINOv2 protocol).

Features are L2-normalised, similarity is the cosine, and each of the k nearest training samples
votes for its class with weight ``exp(similarity / T)`` (T = 0.07). The search is chunked over
test *and* training samples, keeping a running top-k and normalising training chunks on the fly,
so beyond the features themselves memory is one ``chunk_size x train_chunk_size`` block: 1M x
1024-d training features (4 GB in fp32, 2 GB if given in fp16/bf16) are searched with ~0.5 GB on top.
Several k are scored from one top-k search (:func:`.similarity.topk_cosine`); runs on the features' device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .similarity import topk_cosine


def _check(train_features, train_labels, test_features, test_labels=None) -> None:
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"features must be (n, dim) with the same dim; got {tuple(train_features.shape)} and {tuple(test_features.shape)}."
        )
    if len(train_features) != len(train_labels) or (test_labels is not None and len(test_features) != len(test_labels)):
        raise ValueError("each feature matrix needs one label per row.")
    if len(train_features) == 0:
        raise ValueError("the training set is empty.")


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    train_chunk_size: int = 65_536,
    device: str | torch.device | None = None,
) -> dict[int, torch.Tensor]:
    """Predicted class of every test row for every k in ``ks`` (k larger than the training set is clipped).

    ``device`` (default: the training features' device) is where the search runs; the training
    features are normalised there once, test features are moved chunk by chunk.
    """
    _check(train_features, train_labels, test_features)
    device = torch.device(device) if device is not None else train_features.device
    train = train_features.to(device)  # moved once; normalised chunk by chunk in topk_cosine: no second copy
    train_labels = train_labels.to(device).long()
    num_classes = num_classes or int(train_labels.max().item()) + 1
    max_k = min(max(ks), len(train))
    predictions: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, len(test_features), chunk_size):  # votes per test chunk, too
        test = test_features[start : start + chunk_size]
        similarity, index = topk_cosine(test, train, max_k, train_chunk_size, chunk_size, device)
        weights = (similarity / temperature).exp()
        neighbour_labels = train_labels[index]
        for k in ks:
            k_eff = min(k, max_k)
            votes = torch.zeros(len(test), num_classes, device=device)
            votes.scatter_add_(1, neighbour_labels[:, :k_eff], weights[:, :k_eff])
            predictions[k].append(votes.argmax(dim=1).cpu())
    return {k: torch.cat(p) for k, p in predictions.items()}


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    train_chunk_size: int = 65_536,
    device: str | torch.device | None = None,
) -> dict[int, float]:
    """Top-1 accuracy for every k in ``ks`` (k larger than the training set is clipped)."""
    _check(train_features, train_labels, test_features, test_labels)
    num_classes = num_classes or int(max(train_labels.max().item(), test_labels.max().item())) + 1
    predictions = knn_predict(
        train_features, train_labels, test_features, ks, temperature, num_classes, chunk_size, train_chunk_size, device
    )
    test_labels = test_labels.cpu().long()
    return {k: (predictions[k] == test_labels).float().mean().item() for k in ks}
