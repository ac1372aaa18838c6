r"""iBOT masked-patch loss (Zhou et al., 2022; DINOv2 recipe).

Over the masked patches ``p`` of the global crops, with teacher targets ``t_p`` (from the teacher's
*unmasked* view) and student logits ``s_p`` (from the masked view):

    L = - (1 / n_images) * sum_p  w_p * sum_k t_p[k] * log_softmax(s_p / T_s)[k]

where ``w_p = 1 / (number of masked patches of p's image)`` so every masked image counts equally,
and ``n_images`` counts all global-crop images (masked or not), as in the official code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .centering import SoftmaxCenter, sinkhorn_knopp
from .distributed import all_reduce_sum


class iBOTPatchLoss(nn.Module):  # noqa: N801 (the official name)
    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.centering = SoftmaxCenter((1, 1, patch_out_dim), momentum=center_momentum)

    @property
    def center(self) -> torch.Tensor:
        return self.centering.center

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        return self.centering.softmax(teacher_patch_tokens, teacher_temp)

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens: torch.Tensor) -> None:
        """Record the mean teacher logits over this rank's masked patches (n_masked, K)."""
        self.centering.record(teacher_patch_tokens.float().mean(dim=0, keepdim=True).unsqueeze(0), 1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_output: torch.Tensor,
        teacher_temp: float,
        n_masked_patches_tensor: torch.Tensor,
        n_iterations: int = 3,
    ) -> torch.Tensor:
        """Sinkhorn-Knopp over the masked patches of all ranks (their count is all-reduced)."""
        n_total = all_reduce_sum(n_masked_patches_tensor.clone().to(teacher_output.device).float())
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations, n_samples_total=n_total)

    def forward_masked(
        self,
        student_patch_tokens_masked: torch.Tensor,
        teacher_patch_tokens_masked: torch.Tensor,
        student_masks_flat: torch.Tensor,
        n_masked_patches: int | None = None,
        masks_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss from the logits of the masked patches only, ``(n_masked, K)`` each."""
        log_probs = F.log_softmax(student_patch_tokens_masked.float() / self.student_temp, dim=-1)
        loss = torch.sum(teacher_patch_tokens_masked * log_probs, dim=-1)
        if masks_weight is None:
            per_image = 1 / student_masks_flat.sum(-1).clamp(min=1.0)
            masks_weight = per_image.unsqueeze(-1).expand_as(student_masks_flat)[student_masks_flat]
        if n_masked_patches is not None:
            loss = loss[:n_masked_patches]
        return -(loss * masks_weight).sum() / student_masks_flat.shape[0]

    def forward(self, student_patch_tokens: torch.Tensor, teacher_patch_tokens: torch.Tensor, student_masks_flat: torch.Tensor) -> torch.Tensor:
        """Loss from all patch logits ``(B, N, K)``; only masked positions count."""
        log_probs = F.log_softmax(student_patch_tokens.float() / self.student_temp, dim=-1)
        loss = torch.sum(teacher_patch_tokens * log_probs, dim=-1)
        masks = student_masks_flat.float()
        loss = torch.sum(loss * masks, dim=-1) / masks.sum(dim=-1).clamp(min=1.0)
        return -loss.mean()
