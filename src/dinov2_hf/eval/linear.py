"""Linear probing on frozen features: the DINOv2 protocol's many heads at once, and logistic regression.

:func:`linear_probe` trains one linear classifier per (input, learning rate): inputs are the CLS of
the last 1 or 4 blocks, concatenated, with or without the mean patch token; learning rates are a
grid (13 values, scaled by batch/256 as in the official code). All heads see the same batches in one
pass (SGD, momentum 0.9, cosine schedule); the best head is chosen on a validation split carved from
the training set, and its test accuracy is reported.

:func:`logistic_regression` fits scikit-learn's L-BFGS logistic regression on (standardised) CLS
features for a sweep of C, picks C on the same kind of validation split and refits on all training data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .features import Features

LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
C_VALUES = tuple(np.logspace(-6, 5, 12).tolist())  # the official sweep is 45 values over the same range


def train_val_split(n: int, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, val) index split of ``n`` samples; val holds ``round(n * val_fraction)`` (at least 1)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}.")
    n_val = max(1, round(n * val_fraction))
    if n_val >= n:
        raise ValueError(f"{n} training samples are too few to carve a validation split of {val_fraction:.0%}.")
    order = np.random.RandomState(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


@dataclass(frozen=True)
class HeadSpec:
    """One linear classifier's input (last ``n_blocks`` CLS, + mean patch when ``avgpool``) and learning rate."""

    n_blocks: int
    avgpool: bool
    lr: float

    @property
    def name(self) -> str:
        return f"blocks{self.n_blocks}_{'avgpool' if self.avgpool else 'cls'}_lr{self.lr:g}"


class StackedLinear(torch.nn.Module):
    """``heads`` independent linear classifiers over one input, as one batched matmul.

    Each head has its own learning rate: its gradient is scaled by it (with momentum SGD this is
    exactly per-head learning rates), so one optimizer steps all heads.
    """

    def __init__(self, in_features: int, num_classes: int, learning_rates: Sequence[float]) -> None:
        super().__init__()
        heads = len(learning_rates)
        self.weight = torch.nn.Parameter(torch.randn(heads, in_features, num_classes) * 0.01)  # official init
        self.bias = torch.nn.Parameter(torch.zeros(heads, 1, num_classes))
        scale = torch.tensor(learning_rates, dtype=torch.float32)
        self.register_buffer("lr_scale", scale)
        self.weight.register_hook(lambda grad: grad * self.lr_scale.view(-1, 1, 1))
        self.bias.register_hook(lambda grad: grad * self.lr_scale.view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(heads, batch, classes) logits."""
        return torch.einsum("nd,hdc->hnc", x, self.weight) + self.bias


def _accuracies(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == labels).float().mean(-1)


def linear_probe(
    train: Features,
    test: Features,
    n_blocks: Sequence[int] = (1, 4),
    avgpool: Sequence[bool] = (False, True),
    learning_rates: Sequence[float] = LEARNING_RATES,
    epochs: int = 10,
    batch_size: int = 256,
    val_fraction: float = 0.1,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict:
    """Train all heads on ``train`` (minus a validation split), pick the best on validation, score it on ``test``.

    Returns ``{"top1": test accuracy of the best head, "best": its spec and accuracies,
    "heads": {name: validation accuracy}}``.
    """
    if train.labels is None or test.labels is None:
        raise ValueError("linear probing needs labels for the training and test features.")
    available = train.block_cls.shape[1]
    if max(n_blocks) > available:
        raise ValueError(f"n_blocks={tuple(n_blocks)} needs CLS of {max(n_blocks)} blocks; features hold {available}.")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    fit_idx, val_idx = train_val_split(len(train), val_fraction, seed)
    fit_idx, val_idx = torch.from_numpy(fit_idx), torch.from_numpy(val_idx)
    labels = train.labels.long()
    num_classes = int(max(labels.max().item(), test.labels.max().item())) + 1
    scaled_lrs = [lr * batch_size / 256 for lr in learning_rates]  # the official linear-scaling rule
    variants = [(n, pool) for n in n_blocks for pool in avgpool]
    inputs = {v: train.linear_input(*v) for v in variants}
    heads = torch.nn.ModuleDict(
        {f"{n}_{pool}": StackedLinear(inputs[(n, pool)].shape[1], num_classes, scaled_lrs) for n, pool in variants}
    ).to(device)
    optimizer = torch.optim.SGD(heads.parameters(), lr=1.0, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(fit_idx) / batch_size)
    total_steps = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))
    for _ in range(epochs):
        order = fit_idx[torch.randperm(len(fit_idx), generator=generator)]
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            target = labels[batch].to(device)
            loss = 0.0
            for (n, pool), head in zip(variants, heads.values()):
                logits = head(inputs[(n, pool)][batch].to(device))
                # Summed over heads (not averaged) so each head gets exactly its own gradient.
                loss = loss + F.cross_entropy(logits.flatten(0, 1), target.repeat(len(learning_rates)), reduction="sum") / len(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    results, best = {}, None
    with torch.no_grad():
        for (n, pool), head in zip(variants, heads.values()):
            val_acc = _accuracies(head(inputs[(n, pool)][val_idx].to(device)), labels[val_idx].to(device)).cpu()
            test_acc = _accuracies(head(test.linear_input(n, pool).to(device)), test.labels.long().to(device)).cpu()
            for lr, v, t in zip(learning_rates, val_acc.tolist(), test_acc.tolist()):
                spec = HeadSpec(n, pool, lr)
                results[spec.name] = v
                if best is None or v > best[1]:
                    best = (spec, v, t)
    spec, val_acc, test_acc = best
    return {
        "top1": test_acc,
        "best": {"head": spec.name, "n_blocks": spec.n_blocks, "avgpool": spec.avgpool, "lr": spec.lr,
                 "val_top1": val_acc, "test_top1": test_acc},
        "heads": results,
    }


def logistic_regression(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    c_values: Sequence[float] = C_VALUES,
    val_fraction: float = 0.1,
    max_iter: int = 1000,
    seed: int = 0,
) -> dict:
    """Logistic regression (scikit-learn, L-BFGS) with C chosen on a validation split, refit on all training data.

    Features are standardised with statistics of the training data (L-BFGS converges far faster).
    Returns ``{"top1": test accuracy, "best_c": C, "val_top1": {C: validation accuracy}}``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = np.asarray(train_features, dtype=np.float32), np.asarray(train_labels)
    x_test, y_test = np.asarray(test_features, dtype=np.float32), np.asarray(test_labels)
    if x.ndim != 2 or x_test.ndim != 2 or x.shape[1] != x_test.shape[1]:
        raise ValueError(f"features must be (n, dim) with the same dim; got {x.shape} and {x_test.shape}.")
    if len(x) != len(y) or len(x_test) != len(y_test):
        raise ValueError("each feature matrix needs one label per row.")

    def fit(c: float, rows: np.ndarray):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter, random_state=seed))
        return model.fit(x[rows], y[rows])

    fit_idx, val_idx = train_val_split(len(x), val_fraction, seed)
    val_scores = {float(c): float(fit(c, fit_idx).score(x[val_idx], y[val_idx])) for c in c_values}
    best_c = max(val_scores, key=val_scores.get)  # first of the best: the strongest regularisation
    final = fit(best_c, np.arange(len(x)))
    return {"top1": float(final.score(x_test, y_test)), "best_c": best_c, "val_top1": val_scores}
