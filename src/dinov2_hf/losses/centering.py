r"""Teacher targets: softmax centering and Sinkhorn-Knopp.

Both turn teacher logits ``z`` (rows = samples, columns = K prototypes) into target distributions.

Softmax centering (DINO): ``softmax((z - c) / T)`` where the center ``c`` is an EMA (momentum 0.9)
of the batch-mean teacher logits, averaged over all ranks. As in the official code, the batch
mean of step t is applied to the center at step t + 1 (its all-reduce can overlap with compute).

Sinkhorn-Knopp (SwAV, used by DINOv2 for ViT-L/g): start from ``Q = exp(z / T)^T`` (K x B),
normalise it to sum 1, then alternate 3 times: rows sum to 1/K (each prototype gets equal mass,
sums all-reduced over ranks), columns sum to 1/B (B = samples over all ranks). Finally columns are
scaled to sum 1, giving one assignment distribution per sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_reduce_max, all_reduce_sum, world_size

EXP_SAFE = 60.0  # exp(60) ~ 1e26: summed over K x B entries, still far from float32's 3e38
TINY = torch.finfo(torch.float32).tiny


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor,
    teacher_temp: float,
    n_iterations: int = 3,
    n_samples_total: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Sinkhorn-Knopp targets for ``teacher_logits`` (B, K), computed in float32, sums all-reduced.

    ``n_samples_total`` is the number of samples over all ranks (default: B x world size; iBOT
    passes the all-reduced count of masked patches, which differs per rank).
    """
    scaled = teacher_logits.float() / teacher_temp
    # exp overflows float32 above ~88: at low temperatures subtract each prototype's maximum over the samples (of all
    # ranks) first. The first row normalisation cancels it exactly; below the threshold (the official temperatures)
    # nothing is subtracted and the official computation runs bit for bit (x - 0 is x; no host sync either way).
    prototype_max = all_reduce_max(scaled.max(dim=0).values)
    scaled = scaled - torch.where(prototype_max.max() > EXP_SAFE, prototype_max, torch.zeros_like(prototype_max))
    q = torch.exp(scaled).t()  # K x B
    n_prototypes = q.shape[0]
    if n_samples_total is None:
        n_samples_total = q.shape[1] * world_size()
    q /= all_reduce_sum(q.sum())
    for _ in range(n_iterations):
        # (a prototype or sample whose every exp underflowed sums to 0: kept at 0 instead of 0 / 0)
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True)).clamp_min(TINY)
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True).clamp_min(TINY)
        q /= n_samples_total
    q *= n_samples_total
    return q.t()


class SoftmaxCenter(nn.Module):
    """The EMA center of softmax centering, with the official one-step-delayed update.

    The recorded batch sum waits in buffers (saved with checkpoints, so a resumed run applies
    exactly the update the uninterrupted run would have applied).
    """

    def __init__(self, shape: tuple[int, ...], momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(*shape))
        self.register_buffer("pending_sum", torch.zeros(*shape))
        self.register_buffer("pending_count", torch.zeros((), dtype=torch.long))  # 0: nothing pending

    @torch.no_grad()
    def apply_pending_update(self) -> None:
        """Fold the batch mean recorded by :meth:`record` into the center (all-reduced over ranks)."""
        if self.pending_count.item() == 0:
            return
        batch_mean = all_reduce_sum(self.pending_sum.clone()) / (self.pending_count.item() * world_size())
        self.center.mul_(self.momentum).add_(batch_mean, alpha=1 - self.momentum)
        self.pending_sum.zero_()  # rank-local until now: cleared so all ranks hold the same buffers
        self.pending_count.zero_()

    @torch.no_grad()
    def softmax(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        self.apply_pending_update()
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def record(self, teacher_logits_sum: torch.Tensor, count: int) -> None:
        """Remember this batch's logit sum over ``count`` rows; applied at the next :meth:`softmax`."""
        self.pending_sum.copy_(teacher_logits_sum.float())
        self.pending_count.fill_(count)
