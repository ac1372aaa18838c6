"""The trainer's configuration: the objective's recipe plus data and loop settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..data.sources import DataSettings
from ..objective.config import SSLConfig, load_recipe
from ..objective.schedules import ScheduleSettings


@dataclass
class TrainSettings:
    """The ``train:`` section of a recipe: batch, seed and the loop's settings."""

    batch_size_per_device: int = 64  # the schedules scale the learning rate with the global batch
    seed: int = 0
    output_dir: str = "outputs/dinov2"
    # The run's length. Default: the schedule's own (schedule.epochs * schedule.epoch_length, plus the
    # adaptation phase). Another value fits every schedule to it (warm-ups, cosines, teacher temperature,
    # prototype freeze, phase lengths), so a short run is a complete run, not the start of a long one.
    max_steps: int | None = None
    # Stop this session after this step, schedules unchanged (a checkpoint is written, no export): an
    # interruption on purpose, e.g. to split a run into sessions. Rerunning resumes.
    stop_at_step: int | None = None
    num_workers: int = 2
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    compile: bool = False  # torch.compile each transformer block (worth it on GPUs; slow to start on CPU)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (and per EMA update)
    activation_checkpointing: bool = False  # recompute the student's blocks in backward: less memory
    stop_on_collapse: int = 0  # stop (checkpoint, non-zero exit) after this many consecutive collapsed steps; 0: never
    save_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    log_with: str = "auto"  # Accelerate trackers: "auto" (TensorBoard if installed), "none", or e.g. "wandb,tensorboard"
    resume: str = "auto"  # "auto" (newest complete checkpoint in output_dir), "none", or a checkpoint folder
    # The first N steps train the heads only: the student backbone gets no update and its EMA teacher stays put,
    # so that fresh heads do not push random gradients into a pretrained backbone (model.init_from). -1 (auto):
    # 10% of the run when model.init_from starts fresh heads, 0 when it loads the source's heads or without it.
    freeze_backbone_steps: int = -1

    def __post_init__(self) -> None:
        if self.stop_on_collapse < 0:
            raise ValueError(f"train.stop_on_collapse={self.stop_on_collapse} must be 0 (never) or a number of steps.")
        for key in ("max_steps", "stop_at_step"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"train.{key}={value} must be at least 1 (leave it unset for the recipe's own length).")
        # Checked here, not where they are used: a zero fails only after the first step (save_every: a
        # ZeroDivisionError), after the first checkpoint (keep_last) or deep in torch (batch_size_per_device).
        for key, what in (("batch_size_per_device", "images per device and micro-batch"),
                          ("gradient_accumulation_steps", "micro-batches per optimizer step; 1: no accumulation"),
                          ("save_every", "steps between checkpoints"),
                          ("keep_last", "checkpoints kept"),
                          ("log_every", "steps between logged metrics")):
            value = getattr(self, key)
            if value < 1:
                raise ValueError(f"train.{key}={value} must be at least 1 ({what}).")
        if self.freeze_backbone_steps < -1:
            raise ValueError(f"train.freeze_backbone_steps={self.freeze_backbone_steps} must be -1 (auto), 0 (off) or "
                             "a number of steps.")
        if self.num_workers < 0:
            raise ValueError(f"train.num_workers={self.num_workers} must be 0 (load in the main process) or more.")


@dataclass
class MonitorSettings:
    """kNN accuracy of the teacher on a labelled source every ``every`` steps (0: off).

    The first ``train_images`` images of ``source`` are the kNN memory, the next ``test_images``
    the queries, or the first ``test_images`` of ``test_source`` when it is set (e.g. a test split);
    images are resized to the global crop size.
    """

    every: int = 0
    source: str = ""
    test_source: str = ""
    image_column: str = "image"
    label_column: str = "label"
    train_images: int = 5000
    test_images: int = 1000
    k: int = 20


@dataclass
class AdaptationScheduleSettings(ScheduleSettings):
    """The adaptation phase's schedule: off by default (0 epochs); no teacher-temperature warmup and no
    prototype freeze, since it continues from trained weights."""

    epochs: int = 0
    warmup_epochs: int = 1
    warmup_teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 0
    freeze_last_layer_epochs: int = 0


@dataclass
class AdaptationSettings:
    """The paper's resolution adaptation: after the main schedule, ``schedule.epochs x epoch_length``
    more steps with larger crops (518 px global crops for the released models) and their own,
    compressed schedules. The position embeddings are interpolated to the new grid."""

    global_crops_size: int = 518
    local_crops_size: int = 98
    schedule: AdaptationScheduleSettings = field(default_factory=AdaptationScheduleSettings)

    @property
    def steps(self) -> int:
        return self.schedule.epochs * self.schedule.epoch_length


@dataclass
class DistillSettings:
    """Distillation; empty ``teacher``: ordinary self-distillation. The student's spare EMA is exported.

    ``heads`` (DINOv2 paper, Sec. 5): ``teacher`` is a checkpoint folder of one of our runs
    (``output_dir/checkpoints/checkpoint-<step>``); its frozen EMA teacher, heads included, gives the
    DINO/iBOT targets. ``features``: ``teacher`` is any backbone (our folder, a stock transformers
    Dinov2 folder such as a copy of facebook/dinov2-large, a Meta .pth, a Hub id); the student regresses
    its normalised CLS and patch tokens through linear projections (``loss``: cosine or smooth_l1), the
    targets standardised per channel over the batch unless ``standardize_targets`` is false.
    ``teacher_dtype``: the frozen teacher's weights; ``auto`` keeps them in bfloat16 when
    ``train.mixed_precision`` is bf16 (half the memory, bf16 compute), except under FSDP, where they stay
    float32 and sharded (and are gathered in the plugin's bf16 on GPUs).
    ``auto``: ``heads`` when the folder is one of our training checkpoints, else ``features``.
    """

    teacher: str = ""
    mode: Literal["auto", "heads", "features"] = "auto"
    loss: Literal["cosine", "smooth_l1"] = "cosine"
    patch_weight: float = 1.0
    standardize_targets: bool = True
    teacher_dtype: Literal["auto", "bfloat16", "float32"] = "auto"


@dataclass
class HubSettings:
    """Publish the export on the Hub when training ends (main process; see ``dinov2-hf push``).

    ``format``: ``both`` (stock transformers at the root, ours with the heads in ``dinov2_hf/``), ``stock`` or
    ``ours``. ``revision``: a branch (created if missing). A failed push is reported; the export stays.
    """

    push_to_hub: bool = False
    repo_id: str = ""
    private: bool = False
    revision: str = ""
    create_pr: bool = False
    format: Literal["stock", "ours", "both"] = "both"
    commit_message: str = ""

    def __post_init__(self) -> None:
        # The repo id's validity and the token are checked where the run starts (``hub.training.PushToHub``).
        if self.push_to_hub and not self.repo_id:
            raise ValueError("push_to_hub=true needs hub.repo_id (e.g. hub.repo_id=my-user/dinov2-small-cifar).")


@dataclass
class TrainConfig(SSLConfig):
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    monitor: MonitorSettings = field(default_factory=MonitorSettings)
    adaptation: AdaptationSettings = field(default_factory=AdaptationSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)
    hub: HubSettings = field(default_factory=HubSettings)

    @property
    def nominal_steps(self) -> int:
        """The recipe's own length: the main schedule plus the adaptation phase."""
        return self.schedule.epochs * self.schedule.epoch_length + self.adaptation.steps

    @property
    def total_steps(self) -> int:
        """The run's length: ``train.max_steps``, else the recipe's own."""
        return self.train.max_steps or self.nominal_steps

    @property
    def main_steps(self) -> int:
        """Steps of the main phase in this run (the adaptation phase, if any, takes the rest)."""
        main = self.schedule.epochs * self.schedule.epoch_length
        if not self.adaptation.steps or self.total_steps == self.nominal_steps:
            return min(main, self.total_steps)
        return min(max(round(main * self.total_steps / self.nominal_steps), 1), self.total_steps - 1)


def load_train_config(recipe: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a recipe name or YAML file plus ``a.b=value`` overrides."""
    return load_recipe(recipe, overrides, config_class=TrainConfig)
