"""Build what a run optimises: the DINOv2 objective, or distillation with its frozen teacher; its optimizer.

Distillation teachers are read here, through :mod:`training.run_dir` (one of our checkpoints, or a
published ``dinov2_hf/`` folder with its heads), or loaded as any backbone for the headless mode.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..modeling.loading import check_backbone_source, load_backbone
from ..objective import SSLMetaArch, param_groups
from ..objective.config import OptimSettings, SSLConfig
from ..objective.distill import DistillMetaArch, FeatureDistillMetaArch
from ..objective.meta_arch import build_meta_arch
from . import run_dir
from .config import TrainConfig
from .init_from import InitSource, load_init, resolve_init
from .parallelize import fsdp_requested


def load_teacher(folder: str | Path) -> tuple[nn.ModuleDict, SSLConfig]:
    """The frozen EMA teacher (backbone + heads) and its recipe, from one of our training checkpoints
    (``model.safetensors`` or an FSDP2 run's ``sharded/``; of a distillation run: its student's EMA, which
    teaches on, g -> L -> S) or from a published ``dinov2_hf/`` folder (``dinov2-hf push``: backbone
    weights, ``heads.safetensors``, recipe)."""
    folder = Path(folder)
    if not run_dir.has_recipe(folder) or not run_dir.has_weights(folder):
        raise FileNotFoundError(
            f"distill.teacher={folder} is not a training checkpoint of ours (needs {run_dir.CONFIG_FILE} and "
            f"{run_dir.WEIGHTS_FILE} or {run_dir.SHARDED_DIR}/): pass an output_dir/checkpoints/checkpoint-<step> "
            "folder of a dinov2_hf run, or the dinov2_hf/ folder of a pushed repo."
        )
    config = run_dir.read_recipe(folder)
    arch = SSLMetaArch(config)
    if run_dir.is_published(folder):
        state = {f"backbone.{k}": v for k, v in load_file(folder / run_dir.WEIGHTS_FILE).items()}
        state.update(load_file(folder / run_dir.HEADS_FILE))
    else:
        ema = run_dir.read_ema(folder, config)  # the run's exported EMA and its heads
        if not any(name.startswith("dino_head.") for name in ema.heads):
            raise ValueError(
                f"distill.teacher={folder} is a headless distillation checkpoint (projections, no DINO heads): "
                "use its export (output_dir/export/transformers) as a headless teacher instead."
            )
        state = {**{f"backbone.{k}": v for k, v in ema.backbone.state_dict().items()}, **ema.heads}
    arch.teacher.load_state_dict(state, strict=True)
    return arch.teacher, config


def teacher_dtype(config: TrainConfig) -> torch.dtype:
    """The frozen distillation teacher's storage dtype (``distill.teacher_dtype``)."""
    wanted = config.distill.teacher_dtype
    if wanted == "bfloat16" and fsdp_requested():
        raise ValueError(
            "distill.teacher_dtype=bfloat16 under FSDP: FSDP shards the teacher with the student and needs one dtype; "
            "use distill.teacher_dtype=auto (float32 shards, bf16 compute with mixed_precision bf16)."
        )
    if wanted == "auto":
        wanted = "bfloat16" if config.train.mixed_precision == "bf16" and not fsdp_requested() else "float32"
    return getattr(torch, wanted)


def check_teacher_source(config: TrainConfig) -> None:
    """Fail in a moment, before the data or the model is touched, when ``distill.teacher`` cannot be a teacher:
    neither one of our checkpoints (or a published folder) nor a backbone source."""
    teacher = config.distill.teacher
    if teacher and not run_dir.has_recipe(teacher):
        check_backbone_source(teacher, "distill.teacher=")


def build_arch(config: TrainConfig, init: InitSource | None = None) -> nn.Module:
    """The module the trainer optimises: self-distillation, or distillation from ``distill.teacher``.

    With ``model.init_from`` pass the config and source :func:`training.init_from.resolve_init` returned (else it
    is resolved here): the objective is built as from scratch, then the source's weights are copied in."""
    distill = config.distill
    if config.model.init_from and init is None:
        config, init = resolve_init(config)
    if not distill.teacher:
        arch = build_meta_arch(config)
        if init is not None:
            load_init(arch, init)
        return arch
    if config.objective != "dino":
        raise ValueError(f"objective={config.objective}: distillation trains with objective=dino.")
    mode = distill.mode
    if mode == "auto":
        mode = "heads" if run_dir.has_recipe(distill.teacher) else "features"
    dtype = teacher_dtype(config)  # (checked before loading a possibly large teacher)
    # Building the teacher must not draw from the global RNG: the student then starts from the same
    # weights as the same student trained from scratch, so the two runs compare like for like.
    with torch.random.fork_rng(devices=[]):
        if mode == "heads":
            teacher, teacher_config = load_teacher(distill.teacher)
        else:
            teacher_backbone, _ = load_backbone(distill.teacher)
    if mode == "heads":
        return DistillMetaArch(config, teacher, teacher_config, teacher_dtype=dtype)
    return FeatureDistillMetaArch(
        config, teacher_backbone, distill.loss, distill.patch_weight, distill.standardize_targets, dtype
    )


def build_optimizer(arch: nn.Module, settings: OptimSettings) -> torch.optim.AdamW:
    """AdamW over the student's parameter groups (layer-wise lr decay, patch-embedding lr, no decay on norms)."""
    groups = param_groups(arch.student, settings.layerwise_decay, settings.patch_embed_lr_mult)
    return torch.optim.AdamW(groups, betas=(settings.adamw_beta1, settings.adamw_beta2))
