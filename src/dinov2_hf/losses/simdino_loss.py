r"""SimDINO losses (Wu et al., 2025, "Simplifying DINO via Coding Rate Regularization").

SimDINO drops the prototypes, the centering and the teacher temperature. The heads end in the
L2-normalised bottleneck ``z``; the student aligns its features with the teacher's, and a coding-rate
term keeps the features of a batch spread out, which rules out collapse by construction:

    alignment (CLS, over the same cross-view pairs as DINO):  - mean_b < z_s[b], z_t[b] >
    expansion (per global view v, on Z_v = (z_s + z_t) / 2 of that view, m images x p dims):
        R(Z) = 1/2 logdet(I_p + p / (m eps) Z^T Z),   scaled by gamma = (p + m) / (p m)
    CLS loss = alignment / n_pairs - weight * mean_v R(Z_v)
    patch loss (masked patches, weighted as iBOT's):  - sum_i w_i < z_s[i], z_t[i] > / n_global_crops

``eps`` (0.05) and ``gamma`` follow the authors' code (``MCRLoss``, ``expa_type=1``; ``eps`` enters
unsquared there). The coding rate uses each device's batch, like KoLeo. Computed in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def coding_rate(features: torch.Tensor, eps: float = 0.05) -> torch.Tensor:
    """``1/2 logdet(I + p / (m eps) Z^T Z)`` of ``features`` Z (m, p), by a Cholesky factorisation."""
    m, p = features.shape
    features = features.float()
    covariance = features.t() @ features * (p / (m * eps))
    covariance.diagonal().add_(1.0)
    return torch.linalg.cholesky_ex(covariance)[0].diagonal().log().sum()


class SimDINOLoss(nn.Module):
    """CLS alignment over cross-view pairs minus the coding rate of the global views."""

    def __init__(self, eps: float = 0.05, expansion_weight: float = 1.0) -> None:
        super().__init__()
        self.eps = eps
        self.expansion_weight = expansion_weight

    @staticmethod
    def alignment(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Sum over all (student, teacher) view pairs given of ``- mean_b <z_s, z_t>`` (unit vectors)."""
        total = 0.0
        for student in student_features:
            for teacher in teacher_features:
                total = total - (student.float() * teacher.float()).sum(-1).mean()
        return total

    def expansion(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mean over views of the balanced coding rate ``gamma R(Z_v)``."""
        m, p = views[0].shape
        gamma = (p + m) / (p * m)
        return sum(coding_rate(view, self.eps) for view in views) * gamma / len(views)


class SimDINOPatchLoss(nn.Module):
    """Masked-patch alignment: the iBOT term with the cross-entropy replaced by ``- <z_s, z_t>``."""

    def forward_masked(
        self,
        student_patch_features: torch.Tensor,
        teacher_patch_features: torch.Tensor,
        student_masks_flat: torch.Tensor,
        masks_weight: torch.Tensor,
    ) -> torch.Tensor:
        similarity = (student_patch_features.float() * teacher_patch_features.float()).sum(-1)
        return -(similarity * masks_weight).sum() / student_masks_flat.shape[0]
