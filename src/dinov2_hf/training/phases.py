"""Training phases: the main one and, when configured, the paper's resolution adaptation after it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..data.collate import MultiCropCollator
from ..data.transforms import MultiCropSettings
from ..objective import build_schedules
from ..objective.schedules import Schedules
from .config import TrainConfig


@dataclass
class Phase:
    """A stretch of training with its own crop sizes and schedules (main, resolution adaptation)."""

    name: str
    crops: MultiCropSettings
    schedules: Schedules  # indexed from the phase's first step
    collator: MultiCropCollator
    start: int


def build_phases(config: TrainConfig, patch_size: int, num_processes: int) -> list[Phase]:
    """The main phase and, if ``adaptation`` is set, the resolution-adaptation phase after it."""
    train = config.train
    global_batch = train.batch_size_per_device * num_processes * train.gradient_accumulation_steps

    def phase(name: str, crops: MultiCropSettings, schedule, start: int, steps: int) -> Phase:
        collator = MultiCropCollator(
            crops.global_crops_size, patch_size, config.ibot.mask_ratio_min_max, config.ibot.mask_sample_probability
        )
        return Phase(name, crops, build_schedules(schedule, global_batch, total_iters=steps), collator, start)

    main_steps = config.main_steps  # each phase's schedules fitted to its length in this run (train.max_steps)
    phases = [phase("main", config.crops, config.schedule, 0, main_steps)]
    if config.adaptation.steps and config.total_steps > main_steps:
        crops = dataclasses.replace(
            config.crops,
            global_crops_size=config.adaptation.global_crops_size,
            local_crops_size=config.adaptation.local_crops_size,
        )
        phases.append(phase("adaptation", crops, config.adaptation.schedule, main_steps, config.total_steps - main_steps))
    return phases


def phase_at(phases: list[Phase], step: int) -> Phase:
    """The phase step ``step`` belongs to."""
    return [p for p in phases if p.start <= step][-1]
