r"""Distillation of a trained DINOv2 teacher into a smaller student, as in the DINOv2 paper (Sec. 5).

The teacher is a frozen model *with its heads* (the EMA teacher of one of our training checkpoints, read by
``training.build.load_teacher``). The student has its own backbone and heads (same prototype count as the teacher's) and is trained with
the usual DINO and KoLeo terms against the teacher's centred targets; as in the paper, masking and
stochastic depth are off and the iBOT term is applied to *every* patch of the two global crops (the
student sees them unmasked). A spare EMA of the student is kept and is the model exported.

    teacher (frozen, big) --targets--> student (trained, small) --EMA--> student_ema (exported)
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from ..data.collate import MultiCropCollator
from ..modeling import Dinov2HFModel
from .config import SSLConfig
from .meta_arch import SSLMetaArch, StudentWithEMA, build_student_config


def frozen_teacher_precision(teacher: nn.Module) -> contextlib.AbstractContextManager:
    """Autocast to the frozen teacher's storage dtype, so bf16 weights take the fp32 crops (autocast picks
    each op's precision, as in mixed-precision training; on GPUs and CPUs alike); a no-op for an fp32
    teacher, which then follows the run's own mixed precision."""
    parameter = next(teacher.parameters())
    if parameter.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=parameter.device.type, dtype=parameter.dtype)


class DistillMetaArch(SSLMetaArch):
    """Student and its spare EMA (``student_ema``, exported) learning from a frozen ``teacher``."""

    part_names = ("student", "teacher", "student_ema")
    ema_part = "student_ema"
    mask_student_inputs = False

    def __init__(
        self, config: SSLConfig, teacher: nn.ModuleDict, teacher_config: SSLConfig, teacher_dtype: torch.dtype = torch.float32
    ) -> None:
        for name, ours, theirs in (
            ("dino.head_n_prototypes", config.dino.head_n_prototypes, teacher_config.dino.head_n_prototypes),
            ("ibot.separate_head", config.ibot.separate_head, teacher_config.ibot.separate_head),
            ("ibot.head_n_prototypes", config.ibot.head_n_prototypes, teacher_config.ibot.head_n_prototypes),
        ):
            if ours != theirs and (name != "ibot.head_n_prototypes" or config.ibot.separate_head):
                raise ValueError(f"{name}={ours} but the teacher has {theirs}: the student's heads must match the teacher's prototypes.")
        super().__init__(config)
        if self.student["backbone"].config.patch_size != teacher["backbone"].config.patch_size:
            raise ValueError(
                f"student patch size {self.student['backbone'].config.patch_size} != teacher's "
                f"{teacher['backbone'].config.patch_size}: patch-level distillation needs the same patch grid."
            )
        self.student_ema = self.teacher  # SSLMetaArch made it: a frozen copy of the student
        self.teacher = teacher.requires_grad_(False).eval().to(teacher_dtype)
        # Unmasked inputs never use the mask token: a trainable parameter without a gradient stops DDP.
        self.student["backbone"].embeddings.mask_token.requires_grad_(False)

    @torch.no_grad()
    def teacher_logits(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        with frozen_teacher_precision(self.teacher):
            cls_logits, patch_logits = super().teacher_logits(batch)
        return cls_logits.float(), None if patch_logits is None else patch_logits.float()

    def forward(self, batch: dict, teacher_temp: float) -> dict[str, torch.Tensor]:
        # iBOT on every patch of the two global crops: the masks select all patches (inputs stay unmasked).
        if self.config.ibot.loss_weight > 0:
            everything = torch.ones_like(batch["masks"])
            batch = {**batch, **MultiCropCollator.mask_batch(everything, everything.numel())}
        return super().forward(batch, teacher_temp)


def standardize(features: torch.Tensor, dims: tuple[int, ...], eps: float = 1e-6) -> torch.Tensor:
    """Per-channel standardisation over ``dims`` (the batch, and for patch maps the positions).

    A trained teacher's LayerNormed tokens share a large common component (pairwise cosine ~0.9 between
    images), so a cosine loss on them is nearly satisfied by one constant prediction and the student
    learns little of what tells images apart. Regressing ``(t - mean) / std`` keeps only that part.
    """
    features = features.float()
    return (features - features.mean(dim=dims, keepdim=True)) / (features.std(dim=dims, keepdim=True) + eps)


class FeatureDistillMetaArch(StudentWithEMA):
    """Headless distillation from a released backbone (no heads): the student's CLS and patch tokens,
    through small learned linear projections to the teacher's width, regress the teacher's normalised
    (final-LayerNorm) CLS and patch tokens on the same two global crops, standardised per channel over
    the batch (``standardize``: what all images share is removed from the targets; ``standardize_targets``).

    Loss per token: ``1 - cos(P s, t)`` (``cosine``, scale-free, default) or smooth-L1 between ``P s``
    and ``t`` (``smooth_l1``); CLS and patch terms are averaged over tokens and summed with weights
    ``1`` and ``patch_weight``. Patch maps are compared on the student's grid (the teacher's map is
    resized bilinearly when the grids differ). The student's spare EMA is the exported model.
    """

    part_names = ("student", "teacher", "student_ema")
    ema_part = "student_ema"

    def __init__(
        self,
        config: SSLConfig,
        teacher_backbone: nn.Module,
        loss: str = "cosine",
        patch_weight: float = 1.0,
        standardize_targets: bool = True,
        teacher_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if loss not in ("cosine", "smooth_l1"):
            raise ValueError(f"distill.loss={loss!r}: use 'cosine' or 'smooth_l1'.")
        self.config, self.loss_type, self.patch_weight, self.standardize_targets = config, loss, patch_weight, standardize_targets
        backbone = Dinov2HFModel(build_student_config(config))
        width, teacher_width = backbone.config.hidden_size, teacher_backbone.config.hidden_size
        self.student = nn.ModuleDict(
            {"backbone": backbone, "cls_projection": nn.Linear(width, teacher_width), "patch_projection": nn.Linear(width, teacher_width)}
        )
        # Parameters no loss reaches stay frozen (DDP stops on a trainable parameter without a gradient).
        backbone.embeddings.mask_token.requires_grad_(False)  # the inputs are never masked
        if patch_weight == 0:
            self.student["patch_projection"].requires_grad_(False)
        self.student_ema = copy.deepcopy(self.student).requires_grad_(False).eval()
        self.teacher = nn.ModuleDict({"backbone": teacher_backbone}).requires_grad_(False).eval().to(teacher_dtype)

    @staticmethod
    def _tokens(output, registers: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised CLS (B, D) and patch map (B, D, h, w) of a backbone output."""
        patches = output.last_hidden_state[:, 1 + registers :]
        side = int(patches.shape[1] ** 0.5)
        return output.pooler_output, patches.transpose(1, 2).reshape(len(patches), -1, side, side)

    def _distance(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.loss_type == "cosine":
            return 1 - torch.nn.functional.cosine_similarity(prediction.float(), target.float(), dim=-1).mean()
        return torch.nn.functional.smooth_l1_loss(prediction.float(), target.float())

    def forward(self, batch: dict, teacher_temp: float | None = None) -> dict[str, torch.Tensor]:
        crops = batch["global_crops"]
        with torch.no_grad(), frozen_teacher_precision(self.teacher):
            teacher = self.teacher["backbone"]
            teacher_cls, teacher_patches = self._tokens(teacher(crops), teacher.config.num_register_tokens)
        backbone = self.student["backbone"]
        student_cls, student_patches = self._tokens(backbone(crops), backbone.config.num_register_tokens)
        if teacher_patches.shape[-2:] != student_patches.shape[-2:]:
            teacher_patches = torch.nn.functional.interpolate(teacher_patches.float(), size=student_patches.shape[-2:], mode="bilinear", align_corners=False)
        if self.standardize_targets:  # per channel, over the batch (CLS) and over batch and positions (patches)
            teacher_cls, teacher_patches = standardize(teacher_cls, dims=(0,)), standardize(teacher_patches, dims=(0, 2, 3))
        cls_loss = self._distance(self.student["cls_projection"](student_cls), teacher_cls)
        predicted = self.student["patch_projection"](student_patches.flatten(2).transpose(1, 2))
        patch_loss = self._distance(predicted, teacher_patches.flatten(2).transpose(1, 2))
        total = cls_loss + self.patch_weight * patch_loss
        return {"loss": total, "distill_cls_loss": cls_loss.detach(), "distill_patch_loss": patch_loss.detach()}
