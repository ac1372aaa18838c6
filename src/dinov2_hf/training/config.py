"""The trainer's configuration: the objective's recipe plus data and loop settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..data.sources import DataSettings
from ..ssl.config import SSLConfig, TrainSettings, load_recipe


@dataclass
class TrainerSettings(TrainSettings):
    """Loop settings (``train:`` section of a recipe)."""

    output_dir: str = "outputs/dinov2"
    max_steps: int | None = None  # default: schedule.epochs * schedule.epoch_length
    num_workers: int = 2
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    compile: bool = False  # torch.compile each transformer block (worth it on GPUs; slow to start on CPU)
    save_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    log_with: str = "auto"  # Accelerate trackers: "auto" (TensorBoard if installed), "none", or e.g. "wandb,tensorboard"
    resume: str = "auto"  # "auto" (newest complete checkpoint in output_dir), "none", or a checkpoint folder


@dataclass
class MonitorSettings:
    """kNN accuracy of the teacher on a labelled source every ``every`` steps (0: off).

    The first ``train_images`` images of ``source`` are the kNN memory, the next ``test_images``
    the queries; images are resized to the global crop size.
    """

    every: int = 0
    source: str = ""
    image_column: str = "image"
    label_column: str = "label"
    train_images: int = 5000
    test_images: int = 1000
    k: int = 20


@dataclass
class TrainConfig(SSLConfig):
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainerSettings = field(default_factory=TrainerSettings)
    monitor: MonitorSettings = field(default_factory=MonitorSettings)

    @property
    def total_steps(self) -> int:
        return self.train.max_steps or self.schedule.epochs * self.schedule.epoch_length


def load_train_config(recipe: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a recipe name or YAML file plus ``a.b=value`` overrides."""
    return load_recipe(recipe, overrides, config_class=TrainConfig)
