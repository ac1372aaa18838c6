"""Checkpointing: atomic, resumable checkpoint folders ``<root>/checkpoint-<step>`` and the trainer's
:class:`Checkpointer` (save, resume, prune; sharded and unsharded).

A checkpoint is written into a temporary sibling folder, marked complete, then renamed into place
(``os.replace`` is atomic on one filesystem). A crash mid-write leaves only a ``.tmp-`` folder that
is ignored and cleaned up later, never a half checkpoint under the final name; the previous
checkpoints are untouched until the new one is complete.
"""

from __future__ import annotations

import contextlib
import json
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

    def resume(self, resume: str, model: nn.Module, optimizer, config: TrainConfig) -> dict | None:
        """Restore the checkpoint ``resume`` names (``auto``: the newest, ``none``, or a folder) into ``model``,
        ``optimizer`` and the RNGs; drop the later steps' metrics. Returns its trainer state with this rank's
        ``data_position`` (None in checkpoints that predate it) and its ``path``, or None when there is nothing
        to resume.

        Every file is checked before anything is loaded. With ``auto``, a damaged newest checkpoint (a truncated
        or unreadable file: a full disk, an interrupted copy) is moved aside to ``<name>.damaged-<id>`` (kept, not
        deleted) and the previous one is resumed, with a warning. A named checkpoint that is damaged, or one
        written by another architecture than ``config``'s, is an error naming it and the choices."""
        if resume == "none":
            return None
        accelerator = self.accelerator
        candidates = list(reversed(list_checkpoints(self.run.checkpoints))) if resume == "auto" else [Path(resume)]
        path = None
        for candidate in candidates:
            problem = self._agreed(checkpoint_damage(candidate, accelerator.process_index, self.sharded))
            if problem is None:
                path = candidate
                break
            if resume != "auto":
                raise RuntimeError(f"train.resume={candidate} cannot be resumed: {problem}. Resume from an earlier "
                                   "checkpoint (train.resume=<its folder>) or start over (train.resume=none).")
            if accelerator.is_main_process:
                aside = candidate.with_name(f"{candidate.name}.damaged-{uuid.uuid4().hex[:8]}")
                os.replace(candidate, aside)
                logger.warning("%s is damaged (%s): moved aside to %s; resuming from the checkpoint before it.",
                               candidate, problem, aside.name)
            accelerator.wait_for_everyone()
        if path is None:
            return None  # nothing saved yet, or every checkpoint damaged (each moved aside, with a warning)
        mismatch = architecture_mismatch(path, None if self.sharded else accelerator.unwrap_model(model).state_dict())
        if mismatch is not None:
            raise ValueError(other_architecture_message(path, self.run, config, mismatch))
        try:  # (a sharded checkpoint's tensors are compared as they load)
            if self.sharded:
                load_sharded(path / run_dir.SHARDED_DIR, model, optimizer.optimizer)
            else:
                accelerator.load_state(str(path))
        except (ValueError, RuntimeError) as error:
            raise ValueError(other_architecture_message(path, self.run, config, str(error))) from error
        if self.sharded:
            torch.set_rng_state(torch.load(path / run_dir.rng_file(accelerator.process_index), weights_only=True))
        state = run_dir.read_trainer_state(path)
        state["data_position"] = run_dir.read_data_position(path, accelerator.process_index)
        state["path"] = path
        if accelerator.is_main_process:  # drop steps the checkpoint does not hold
            self.run.truncate_metrics(state["step"])
        logger.info("Resumed from %s at step %d", path, state["step"])
        return state

    def _agreed(self, problem: str | None) -> str | None:
        """Every rank's verdict on one checkpoint: damaged when any rank found its own files damaged."""
        if self.accelerator.num_processes == 1:
            return problem
        from accelerate.utils import gather_object

        problems = [p for p in gather_object([problem]) if p is not None]
        return problems[0] if problems else None


def checkpoint_damage(path: Path, rank: int, sharded: bool) -> str | None:
    """What makes checkpoint ``path`` unreadable for ``rank`` (a file missing, truncated or not what it should
    be), or None. Reads headers and small files only: a safetensors header covers its data; a ``torch.save``
    archive ends with its directory; the RNG states are loaded as Accelerate loads them, since Accelerate ignores
    a failure there (the run would go on silently, on another trajectory)."""
    import zipfile

    from accelerate.utils import load as accelerate_load
    from safetensors import safe_open

    if not path.is_dir():
        return "no such checkpoint folder"
    current = path / run_dir.TRAINER_STATE_FILE
    try:
        json.loads(current.read_text())
        position = path / run_dir.data_position_file(rank)
        if position.exists():
            current = position
            json.loads(position.read_text())
        if sharded:
            current = path / run_dir.SHARDED_DIR / ".metadata"
            current.read_bytes()
            current = path / run_dir.rng_file(rank)
            torch.load(current, weights_only=True)
            return None
        current = path / run_dir.WEIGHTS_FILE
        with safe_open(current, framework="pt"):
            pass
        for current in sorted(path.glob("*.bin")):  # optimizer.bin and other torch.save archives
            zipfile.ZipFile(current).close()
        current = path / f"random_states_{rank}.pkl"
        states = accelerate_load(current)
        if not isinstance(states, dict) or not {"random_state", "numpy_random_seed", "torch_manual_seed"} <= set(states):
            raise ValueError("not the random states Accelerate saves")
    except Exception as error:  # any failure to read means the same: this checkpoint cannot be resumed
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        return f"{current.name}: {reason}"
    return None


def architecture_mismatch(path: Path, state: dict[str, torch.Tensor] | None) -> str | None:
    """How the tensors of an unsharded checkpoint differ from ``state`` (the model's state dict) in names or
    shapes, read from the safetensors header before anything is loaded; None when they fit (or for a sharded
    checkpoint, ``state`` None, whose load reports a mismatch itself)."""
    from safetensors import safe_open

    weights = path / run_dir.WEIGHTS_FILE
    if state is None or not weights.is_file():
        return None
    with safe_open(weights, framework="pt") as file:
        saved = {key: list(file.get_slice(key).get_shape()) for key in file.keys()}
    expected = {key: list(value.shape) for key, value in state.items()}
    stored = {state[key].data_ptr() for key in saved if key in state}
    shapes = sorted(key for key in saved.keys() & expected.keys() if saved[key] != expected[key])
    unexpected = sorted(saved.keys() - expected.keys())
    # Accelerate saves a tensor shared by two names once: a name missing is fine when its tensor is stored.
    missing = sorted(key for key in expected.keys() - saved.keys() if state[key].data_ptr() not in stored)
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} tensors differ in shape, e.g. {shapes[0]}: {saved[shapes[0]]} there, "
                        f"{expected[shapes[0]]} here")
    if missing:
        problems.append(f"{len(missing)} tensors of this model are not in it, e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} of its tensors are not in this model, e.g. {unexpected[0]}")
    return "; ".join(problems) or None


ARCHITECTURE_SECTIONS = ("model", "dino", "ibot", "objective", "simdino", "distill")


def recipe_differences(saved: TrainConfig, current: TrainConfig, sections: tuple[str, ...] = ARCHITECTURE_SECTIONS) -> list[str]:
    """``key: saved value -> current value`` for each field of ``sections`` that differs between two recipes."""
    from ..config_utils import to_dict

    def flat(value, prefix: str) -> dict:
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}.{key}").items()}
        return {prefix: value}

    old, new = to_dict(saved), to_dict(current)
    before = {k: v for section in sections if section in old for k, v in flat(old[section], section).items()}
    after = {k: v for section in sections if section in new for k, v in flat(new[section], section).items()}
    return [f"{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in sorted(before.keys() | after.keys())
            if before.get(key) != after.get(key)]


def other_architecture_message(path: Path, run: RunDir, config: TrainConfig, reason: str) -> str:
    """The error for a checkpoint that does not fit this run's model: what differs, and the two ways out."""
    differences = recipe_differences(run_dir.read_recipe(path), config) if run_dir.has_recipe(path) else []
    recipe = f" Its recipe -> this one: {'; '.join(differences[:6])}." if differences else ""
    return (
        f"{run.root} holds a run of another configuration: {path.name} does not fit this model ({reason[:400]}).{recipe} "
        "Give this config another train.output_dir, or start it over in this folder with train.resume=none (the "
        "old checkpoints are then replaced as the new run saves)."
    )
