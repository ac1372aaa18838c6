r"""DINO loss on the CLS token (Caron et al., 2021; DINOv2 recipe).

For student logits ``s`` and teacher targets ``t`` (rows are images):

    L(s, t) = - mean_b  sum_k  t[b, k] * log_softmax(s[b] / T_s)[k]        (T_s = 0.1)

``forward`` sums ``L`` over every (student view, teacher view) pair it is given; the
meta-architecture calls it with cross-view pairs only (a global crop is never matched to its own
teacher view) and divides by the number of pairs (2 + 2 x n_local = 18 for 8 local crops).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .centering import SoftmaxCenter, sinkhorn_knopp


class DINOLoss(nn.Module):
    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.centering = SoftmaxCenter((1, out_dim), momentum=center_momentum)

    @property
    def center(self) -> torch.Tensor:
        return self.centering.center

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """softmax((teacher_output - center) / teacher_temp), with the center of previous steps."""
        return self.centering.softmax(teacher_output, teacher_temp)

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """Record this batch's mean teacher logits; folded into the center at the next step."""
        self.centering.record(teacher_output.float().sum(dim=0, keepdim=True), len(teacher_output))

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations)

    def forward(self, student_output_list: Sequence[torch.Tensor], teacher_out_softmaxed_centered_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Sum over all (student, teacher) pairs of the batch-mean cross-entropy."""
        total = 0.0
        for student in student_output_list:
            log_probs = F.log_softmax(student.float() / self.student_temp, dim=-1)
            for teacher in teacher_out_softmaxed_centered_list:
                total = total - torch.sum(teacher * log_probs, dim=-1).mean()
        return total
