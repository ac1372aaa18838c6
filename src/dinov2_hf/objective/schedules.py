"""Per-iteration schedules of the DINOv2 recipe ("epoch" = a fixed number of iterations, 1250 officially)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np


class CosineScheduler:
    """``freeze_iters`` zeros, a linear warmup from ``start_warmup_value`` to ``base_value`` over
    ``warmup_iters``, then a half cosine from ``base_value`` to ``final_value``; ``final_value``
    after ``total_iters``. Identical to the official scheduler."""

    def __init__(
        self,
        base_value: float,
        final_value: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup_value: float = 0.0,
        freeze_iters: int = 0,
    ) -> None:
        if warmup_iters + freeze_iters > total_iters:
            raise ValueError(f"warmup ({warmup_iters}) + freeze ({freeze_iters}) iterations exceed the total ({total_iters}).")
        self.final_value = final_value
        self.total_iters = total_iters
        self.warmup_iters = freeze_iters + warmup_iters
        freeze = np.zeros(freeze_iters)
        warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
        iters = np.arange(total_iters - warmup_iters - freeze_iters)
        cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
        self.schedule = np.concatenate((freeze, warmup, cosine))

    def __getitem__(self, iteration: int) -> float:
        if iteration >= self.total_iters:
            return self.final_value
        return float(self.schedule[iteration])


@dataclass
class ScheduleSettings:
    """The optimisation schedule of a recipe, in epochs of ``epoch_length`` iterations."""

    epochs: int = 100
    epoch_length: int = 1250
    base_lr: float = 0.004
    lr_scaling: Literal["sqrt_wrt_1024", "none"] = "sqrt_wrt_1024"  # lr = base_lr * sqrt(batch / 1024); "none" keeps base_lr
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30
    freeze_last_layer_epochs: int = 1


def scaled_lr(config: ScheduleSettings, global_batch_size: int) -> float:
    if config.lr_scaling == "sqrt_wrt_1024":
        return config.base_lr * math.sqrt(global_batch_size / 1024.0)
    if config.lr_scaling == "none":
        return config.base_lr
    raise ValueError(f"lr_scaling={config.lr_scaling!r}: use 'sqrt_wrt_1024' or 'none'.")


@dataclass
class Schedules:
    lr: CosineScheduler
    weight_decay: CosineScheduler
    momentum: CosineScheduler
    teacher_temp: CosineScheduler
    last_layer_lr: CosineScheduler

    def at(self, iteration: int) -> dict[str, float]:
        return {
            "lr": self.lr[iteration],
            "weight_decay": self.weight_decay[iteration],
            "momentum": self.momentum[iteration],
            "teacher_temp": self.teacher_temp[iteration],
            "last_layer_lr": self.last_layer_lr[iteration],
        }


def build_schedules(config: ScheduleSettings, global_batch_size: int, total_iters: int | None = None) -> Schedules:
    """The official schedules: lr (sqrt scaling, warmup, cosine), weight decay and teacher momentum
    (cosine), teacher temperature (linear warmup, then constant), last-layer lr (lr, zero while the
    prototypes are frozen).

    ``total_iters`` fits the whole schedule to a run of that many iterations (``train.max_steps``):
    every length given in epochs (warmups, teacher-temperature warmup, prototype freeze, cosine) is
    scaled by ``total_iters / (epochs * epoch_length)``, so a short run is a complete one. ``None``
    (or the schedule's own length) gives the official schedule unchanged.
    """
    nominal = config.epochs * config.epoch_length
    total = nominal if total_iters is None else total_iters
    if total < 1:
        raise ValueError(f"a schedule needs at least 1 iteration, got {total}.")

    def iters(epochs: float) -> int:
        """Iterations of ``epochs`` epochs in this run (rounded; exact when the run has its nominal length)."""
        return epochs * config.epoch_length if total == nominal else round(epochs * config.epoch_length * total / nominal)

    warmup_temp_iters = iters(config.warmup_teacher_temp_epochs)
    lr = dict(
        base_value=scaled_lr(config, global_batch_size),
        final_value=config.min_lr,
        total_iters=total,
        warmup_iters=iters(config.warmup_epochs),
        start_warmup_value=0.0,
    )
    last_layer_lr = CosineScheduler(**lr)
    last_layer_lr.schedule[: iters(config.freeze_last_layer_epochs)] = 0.0
    return Schedules(
        lr=CosineScheduler(**lr),
        weight_decay=CosineScheduler(config.weight_decay, config.weight_decay_end, total),
        momentum=CosineScheduler(config.momentum_teacher, config.final_momentum_teacher, total),
        teacher_temp=CosineScheduler(
            config.teacher_temp,
            config.teacher_temp,
            warmup_temp_iters,
            warmup_iters=warmup_temp_iters,
            start_warmup_value=config.warmup_teacher_temp,
        ),
        last_layer_lr=last_layer_lr,
    )
