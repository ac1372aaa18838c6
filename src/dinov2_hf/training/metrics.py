"""What a run reports per step: ``metrics.jsonl`` (every step, whatever the trackers), Accelerate's trackers
(every ``train.log_every`` steps), the progress bar, and the collapse watch (a warning naming the recipe keys to
change; ``train.stop_on_collapse`` stops the run)."""

from __future__ import annotations

import logging
from pathlib import Path

from accelerate import Accelerator
from tqdm.auto import tqdm

from ..config_utils import to_dict
from ..objective.meta_arch import collapse_advice
from .config import TrainConfig
from .phases import Phase
from .run_dir import RunDir

logger = logging.getLogger(__name__)
COLLAPSE_WARNING_EVERY = 100  # steps between two collapse warnings at most


def trackers(log_with: str) -> list[str] | None:
    """``auto``: TensorBoard when it is installed; ``none``; or a comma-separated list for Accelerate."""
    if log_with == "none":
        return None
    if log_with == "auto":
        from accelerate.utils import is_tensorboard_available

        return ["tensorboard"] if is_tensorboard_available() else None
    return [name.strip() for name in log_with.split(",") if name.strip()]


class CollapseWatch:
    """Counts consecutive collapsed steps after each phase's lr warm-up; warns (at most once per 100 steps)
    naming the recipe keys to change, and asks to stop after ``train.stop_on_collapse`` of them."""

    def __init__(self, stop_after: int) -> None:
        self.stop_after = stop_after
        self.collapsed_steps = 0
        self._last_warning = -(10**9)

    def __call__(self, record: dict, phase: Phase) -> bool:
        """Watch one step's record; True when the run should stop."""
        step = record["step"]
        after_warmup = step - phase.start >= phase.schedules.lr.warmup_iters
        self.collapsed_steps = self.collapsed_steps + 1 if record.get("collapse") and after_warmup else 0
        if not self.collapsed_steps:
            return False
        if step - self._last_warning >= COLLAPSE_WARNING_EVERY or self.collapsed_steps == self.stop_after:
            self._last_warning = step
            logger.warning("Step %d: %s", step, collapse_advice(record))
        return bool(self.stop_after) and self.collapsed_steps >= self.stop_after


class MetricsLogger:
    """Records of one run's steps, from every process (files and bar from the main one only)."""

    def __init__(self, accelerator: Accelerator, run: RunDir, config: TrainConfig) -> None:
        self.accelerator, self.run, self.config = accelerator, run, config
        self.progress = None

    def start(self, step: int, resumed_from: Path | None = None) -> None:
        """Open the trackers and the progress bar at ``step`` (a resumed run's first, which says where it resumed
        from). ``metrics.jsonl`` keeps the steps before it only: a run killed before its first checkpoint restarts
        from 0 without duplicate rows."""
        if self.accelerator.is_main_process:
            self.run.truncate_metrics(step)
            if resumed_from is not None:
                tqdm.write(f"resumed from {resumed_from} (step {step} of {self.config.total_steps})")
        self.accelerator.init_trackers("dinov2_hf", config={k: str(v) for k, v in to_dict(self.config).items()})
        self.progress = tqdm(
            total=self.config.total_steps, initial=step, desc="dinov2", unit="step", disable=not self.accelerator.is_main_process
        )

    def log(self, record: dict, steps: int, images_per_second: float, skipped_images: int) -> None:
        """Report ``record``, the step that made ``steps`` steps in all."""
        if self.accelerator.is_main_process:
            self.run.append_metrics({**record, "images_per_second": images_per_second})
        if steps % self.config.train.log_every == 0 or steps == self.config.total_steps:
            metrics = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self.accelerator.log({**metrics, "images_per_second": images_per_second}, step=steps)
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{images_per_second:.0f}", skipped=skipped_images)
            self.progress.update(1)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
