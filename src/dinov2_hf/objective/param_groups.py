"""Optimizer parameter groups of the DINOv2 recipe.

Per parameter: a learning-rate multiplier ``layerwise_decay ** (n_blocks + 1 - layer_id)`` where
layer_id is 0 for the embeddings (patch, CLS, registers, mask token, positions), i + 1 for block i
and n_blocks + 1 for the final norm and the heads; an extra ``patch_embed_lr_mult`` for the patch
embedding; no weight decay on biases, norms and LayerScale. The prototype (last) layer is flagged
so the trainer can freeze it at the start. Parameters with equal settings share one group.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch import nn


def backbone_layer_id(name: str, n_blocks: int) -> int:
    """Depth of a backbone parameter for layer-wise lr decay (our parameter names)."""
    if name.startswith("embeddings."):
        return 0
    match = re.match(r"^encoder\.layer\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    return n_blocks + 1


def no_weight_decay(name: str) -> bool:
    return name.endswith(".bias") or "norm" in name or "layer_scale" in name or name.endswith(".gamma")


def param_groups(
    student: nn.ModuleDict,
    layerwise_decay: float = 0.9,
    patch_embed_lr_mult: float = 0.2,
) -> list[dict]:
    """Groups for ``torch.optim.AdamW`` over ``student`` (``backbone`` + heads).

    Each group carries ``lr_multiplier``, ``wd_multiplier`` and ``is_last_layer``; the trainer sets
    ``lr`` and ``weight_decay`` from the schedules every step with :func:`apply_schedules`.
    """
    backbone = student["backbone"]
    n_blocks = backbone.config.num_hidden_layers
    grouped: dict[tuple, list[torch.nn.Parameter]] = defaultdict(list)
    names: dict[tuple, list[str]] = defaultdict(list)
    for module_name, module in student.items():
        for name, parameter in module.named_parameters():
            if not parameter.requires_grad:
                continue
            if module_name == "backbone":
                lr_mult = layerwise_decay ** (n_blocks + 1 - backbone_layer_id(name, n_blocks))
                if name.startswith("embeddings.patch_embeddings."):
                    lr_mult *= patch_embed_lr_mult
            else:
                lr_mult = 1.0
            key = (lr_mult, 0.0 if no_weight_decay(name) else 1.0, "last_layer" in name)
            grouped[key].append(parameter)
            names[key].append(f"{module_name}.{name}")
    return [
        {"params": params, "lr_multiplier": key[0], "wd_multiplier": key[1], "is_last_layer": key[2], "names": names[key]}
        for key, params in grouped.items()
    ]


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float, last_layer_lr: float) -> None:
    """Set every group's lr and weight decay for this iteration, as the official training loop does."""
    for group in optimizer.param_groups:
        group["weight_decay"] = weight_decay * group["wd_multiplier"]
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]
