r"""Weighted k-nearest-neighbour classification on frozen features (DINO / DINOv2 protocol).

Features are L2-normalised, similarity is the cosine, and each of the k nearest training samples
votes for its class with weight ``exp(similarity / T)`` (T = 0.07). Test samples are processed in
chunks so that the similarity matrix never exceeds ``chunk_size x n_train``; several k are scored
from one top-k search.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


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
) -> dict[int, float]:
    """Top-1 accuracy for every k in ``ks`` (k larger than the training set is clipped)."""
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"features must be (n, dim) with the same dim; got {tuple(train_features.shape)} and {tuple(test_features.shape)}."
        )
    if len(train_features) != len(train_labels) or len(test_features) != len(test_labels):
        raise ValueError("each feature matrix needs one label per row.")
    device = train_features.device
    train = F.normalize(train_features.float(), dim=1)
    train_labels = train_labels.to(device).long()
    num_classes = num_classes or int(max(train_labels.max().item(), test_labels.max().item())) + 1
    max_k = min(max(ks), len(train))
    correct = {k: 0 for k in ks}
    for start in range(0, len(test_features), chunk_size):
        test = F.normalize(test_features[start : start + chunk_size].to(device).float(), dim=1)
        labels = test_labels[start : start + chunk_size].to(device)
        similarity, index = (test @ train.t()).topk(max_k, dim=1)
        weights = (similarity / temperature).exp()
        neighbour_labels = train_labels[index]
        for k in ks:
            k_eff = min(k, max_k)
            votes = torch.zeros(len(test), num_classes, device=device)
            votes.scatter_add_(1, neighbour_labels[:, :k_eff], weights[:, :k_eff])
            correct[k] += (votes.argmax(dim=1) == labels).sum().item()
    return {k: correct[k] / len(test_features) for k in ks}
