r"""Distillation of a trained DINOv2 teacher into a smaller student, as in the DINOv2 paper (Sec. 5).

The teacher is a frozen model *with its heads* (the EMA teacher of one of our training checkpoints).
The student has its own backbone and heads (same prototype count as the teacher's) and is trained with
the usual DINO and KoLeo terms against the teacher's centred targets; as in the paper, masking and
stochastic depth are off and the iBOT term is applied to *every* patch of the two global crops (the
student sees them unmasked). A spare EMA of the student is kept and is the model exported.

    teacher (frozen, big) --targets--> student (trained, small) --EMA--> student_ema (exported)
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..data.collate import MultiCropCollator
from .config import SSLConfig
from .meta_arch import SSLMetaArch

TEACHER_CONFIG = "train_config.yaml"  # written into every training checkpoint


def load_teacher(checkpoint: str | Path) -> tuple[nn.ModuleDict, SSLConfig]:
    """The frozen EMA teacher (backbone + heads) of one of our training checkpoints, and its recipe."""
    from ..training.config import load_train_config

    folder = Path(checkpoint)
    if not (folder / TEACHER_CONFIG).is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"distill.teacher={folder} is not a training checkpoint of ours (needs {TEACHER_CONFIG} and model.safetensors): "
            "pass an output_dir/checkpoints/checkpoint-<step> folder of a dinov2_hf run."
        )
    config = load_train_config(folder / TEACHER_CONFIG)
    arch = SSLMetaArch(config)
    state = {k[len("teacher.") :]: v for k, v in load_file(folder / "model.safetensors").items() if k.startswith("teacher.")}
    arch.teacher.load_state_dict(state, strict=True)
    return arch.teacher, config


class DistillMetaArch(SSLMetaArch):
    """Student and its spare EMA (``student_ema``, exported) learning from a frozen ``teacher``."""

    ema_part = "student_ema"
    mask_student_inputs = False

    def __init__(self, config: SSLConfig, teacher: nn.ModuleDict, teacher_config: SSLConfig) -> None:
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
        self.teacher = teacher.requires_grad_(False).eval()

    def parts(self) -> list[nn.ModuleDict]:
        return [self.student, self.teacher, self.student_ema]

    def train(self, mode: bool = True) -> "DistillMetaArch":
        super().train(mode)
        self.student_ema.eval()
        return self

    def forward(self, batch: dict, teacher_temp: float) -> dict[str, torch.Tensor]:
        # iBOT on every patch of the two global crops: the masks select all patches (inputs stay unmasked).
        if self.config.ibot.loss_weight > 0:
            everything = torch.ones_like(batch["masks"])
            batch = {**batch, **MultiCropCollator.mask_batch(everything, everything.numel())}
        return super().forward(batch, teacher_temp)
