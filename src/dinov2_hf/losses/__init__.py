"""DINOv2 losses, named and called like the official ``dinov2.loss`` module.

Each loss is one small module with its math in the docstring:
``DINOLoss`` (CLS cross-entropy), ``iBOTPatchLoss`` (masked patches), ``KoLeoLoss`` (uniformity),
``SimDINOLoss`` / ``SimDINOPatchLoss`` (SimDINO's alignment and coding rate),
and the teacher target functions ``sinkhorn_knopp`` / ``SoftmaxCenter``.
"""

from .centering import SoftmaxCenter, sinkhorn_knopp
from .dino_clstoken_loss import DINOLoss
from .ibot_patch_loss import iBOTPatchLoss
from .koleo_loss import KoLeoLoss
from .simdino_loss import SimDINOLoss, SimDINOPatchLoss, coding_rate

__all__ = ["DINOLoss", "KoLeoLoss", "SimDINOLoss", "SimDINOPatchLoss", "SoftmaxCenter", "coding_rate", "iBOTPatchLoss", "sinkhorn_knopp"]
