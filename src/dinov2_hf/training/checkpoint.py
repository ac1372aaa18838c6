"""Checkpointing: atomic, resumable checkpoint folders ``<root>/checkpoint-<step>`` and the trainer's
:class:`Checkpointer` (save, resume, prune; sharded and unsharded).

A checkpoint is written into a temporary sibling folder, marked complete, then renamed into place
(``os.replace`` is atomic on one filesystem). A crash mid-write leaves only a ``.tmp-`` folder that
is ignored and cleaned up later, never a half checkpoint under the final name; the previous
checkpoints are untouched until the new one is complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from . import run_dir
from .config import TrainConfig
from .parallelize import load_sharded, save_sharded
from .run_dir import COMPLETE_MARKER, TEMPORARY_PREFIXES, RunDir, checkpoint_name, list_checkpoints

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_checkpoint(
    root: str | Path, step: int, is_main_process: bool = True, wait_for_everyone: Callable[[], None] = lambda: None
) -> Iterator[Path]:
    """Yield a temporary folder to write checkpoint ``step`` into; on success it becomes
    ``root/checkpoint-<step>`` (replacing an older one of the same step), on error it is removed.

    With several processes every rank calls this (``wait_for_everyone`` is a barrier): all ranks
    write into the same temporary folder, and the main process alone creates and renames it, after
    every rank has finished writing.
    """
    root = Path(root)
    final = root / checkpoint_name(step)
    temporary = root / f"{TEMPORARY_PREFIXES[0]}{step}"
    if is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)  # left over by a crash at this very step
        temporary.mkdir()
    wait_for_everyone()
    try:
        yield temporary
        wait_for_everyone()
        if is_main_process:
            (temporary / COMPLETE_MARKER).write_text(str(step))
            if final.exists():
                backup = root / f"{TEMPORARY_PREFIXES[1]}{step}-{uuid.uuid4().hex[:8]}"
                os.replace(final, backup)
                os.replace(temporary, final)
                shutil.rmtree(backup, ignore_errors=True)
            else:
                os.replace(temporary, final)
        wait_for_everyone()
    except BaseException:
        if is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        raise


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints and any leftover temporary
    folders of interrupted writes; returns what was removed."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}.")
    root = Path(root)
    removed = list_checkpoints(root)[:-keep_last]
    if root.is_dir():
        removed += [p for p in root.iterdir() if p.name.startswith(TEMPORARY_PREFIXES)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


class Checkpointer:
    """Saves and restores a run's training state in ``run.checkpoints``: Accelerate's ``save_state`` (model,
    optimizer, RNG states) for unsharded runs, DCP shards and each rank's torch RNG for FSDP2 runs; the trainer
    state and the recipe beside them; only the newest ``keep_last`` kept. Every process calls every method."""

    def __init__(self, accelerator: Accelerator, run: RunDir, sharded: bool, keep_last: int) -> None:
        self.accelerator, self.run, self.sharded, self.keep_last = accelerator, run, sharded, keep_last

    def save(self, model: nn.Module, optimizer, step: int, state: dict, config: TrainConfig, data_position: dict) -> Path:
        """Checkpoint ``step`` (atomic); ``state`` is the trainer's position and records, ``data_position`` this
        rank's position in its pass over the data."""
        accelerator = self.accelerator
        with atomic_checkpoint(self.run.checkpoints, step, accelerator.is_main_process, accelerator.wait_for_everyone) as folder:
            run_dir.write_data_position(folder, accelerator.process_index, data_position)
            if self.sharded:
                save_sharded(folder / run_dir.SHARDED_DIR, model, optimizer.optimizer)
                torch.save(torch.get_rng_state(), folder / run_dir.rng_file(accelerator.process_index))
            else:
                accelerator.save_state(str(folder))
            if accelerator.is_main_process:
                run_dir.write_trainer_state(folder, state)
                # The recipe travels with the weights: a checkpoint can serve as a distillation teacher.
                run_dir.write_recipe(folder, config)
        if accelerator.is_main_process:
            prune_checkpoints(self.run.checkpoints, self.keep_last)
        return self.run.checkpoint(step)

    def resume(self, resume: str, model: nn.Module, optimizer) -> dict | None:
        """Restore the checkpoint ``resume`` names (``auto``: the newest, ``none``, or a folder) into ``model``,
        ``optimizer`` and the RNGs; drop the later steps' metrics. Returns its trainer state with this rank's
        ``data_position`` (None in checkpoints that predate it), or None when there is nothing to resume."""
        if resume == "none":
            return None
        path = self.run.latest() if resume == "auto" else Path(resume)
        if path is None:
            return None
        state = run_dir.read_trainer_state(path)  # fails on an incomplete checkpoint before loading anything
        if self.sharded:
            load_sharded(path / run_dir.SHARDED_DIR, model, optimizer.optimizer)
            torch.set_rng_state(torch.load(path / run_dir.rng_file(self.accelerator.process_index), weights_only=True))
        else:
            self.accelerator.load_state(str(path))
        state["data_position"] = run_dir.read_data_position(path, self.accelerator.process_index)
        if self.accelerator.is_main_process:  # drop steps the checkpoint does not hold
            self.run.truncate_metrics(state["step"])
        logger.info("Resumed from %s at step %d", path, state["step"])
        return state
