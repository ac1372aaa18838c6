r"""KoLeo regulariser (Sablayrolles et al., 2019), as used by DINOv2 on the student CLS token.

For L2-normalised features ``x_1..x_n`` and ``d_i`` the distance of ``x_i`` to its nearest other
feature:  ``L = - (1 / n) * sum_i log(d_i + eps)``. It spreads features uniformly on the sphere.
Computed in float32 (outside autocast). A batch of one image has no neighbour: the loss is 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, student_output: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=student_output.device.type, enabled=False):
            features = F.normalize(student_output.float(), p=2, dim=-1, eps=self.eps)
            n = features.shape[0]
            if n < 2:
                return features.sum() * 0.0  # keeps the graph, contributes nothing
            with torch.no_grad():
                dots = features @ features.t()
                dots.fill_diagonal_(-2.0)  # below any cosine: never one's own neighbour
                neighbours = dots.argmax(dim=1)
            # PairwiseDistance semantics: || x - y + eps ||_2
            distances = (features - features[neighbours] + self.eps).norm(dim=-1)
            return -torch.log(distances + self.eps).mean()
