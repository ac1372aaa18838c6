"""A training run's on-disk format: the one module that knows its file and folder names.

::

    output_dir/
      metrics.jsonl                      one JSON line per optimizer step
      checkpoints/checkpoint-<step>/     complete checkpoints (``COMPLETE`` marker; see ``training.checkpoint``)
        trainer_state.json               step, data position, skipped images, compute record
        train_config.yaml                the recipe: a checkpoint is also a distillation teacher
        model.safetensors ...            Accelerate's ``save_state`` (unsharded runs), or
        sharded/ + torch_rng_<rank>.pt   FSDP2: ``torch.distributed.checkpoint`` shards and each rank's RNG
        data_position_<rank>.json        where each rank's pass over the data stands (``data.position``)
      export/dinov2_hf/                  the exported backbone in our format
      export/transformers/               ... and in stock transformers format
      export/COMPLETE                    the step the export was made at, written once both formats are

A published ``dinov2_hf/`` folder (``dinov2-hf push``) holds our export plus ``heads.safetensors`` and the
recipe; :func:`read_ema` reads checkpoints, :mod:`training.build` both.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..config_utils import to_dict
from .config import TrainConfig, load_train_config

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
EXPORT_DIR = "export"
OURS_FORMAT = "dinov2_hf"  # export subfolders are named after their format
STOCK_FORMAT = "transformers"
EXPORT_FORMATS = (OURS_FORMAT, STOCK_FORMAT)
TRAINER_STATE_FILE = "trainer_state.json"
CONFIG_FILE = "train_config.yaml"
COMPLETE_MARKER = "COMPLETE"
SHARDED_DIR = "sharded"
WEIGHTS_FILE = "model.safetensors"  # Accelerate's save_state, and our exports
HEADS_FILE = "heads.safetensors"  # the EMA heads beside a published backbone
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TEMPORARY_PREFIXES = (".tmp-checkpoint-", ".old-checkpoint-")  # leftovers of interrupted checkpoint writes


def checkpoint_name(step: int) -> str:
    """``checkpoint-<step>``: the folder of the checkpoint written after ``step`` optimizer steps."""
    return f"checkpoint-{step}"


def rng_file(rank: int) -> str:
    """The torch RNG state of ``rank`` in a sharded checkpoint (Accelerate saves it for unsharded ones)."""
    return f"torch_rng_{rank}.pt"


def data_position_file(rank: int) -> str:
    """Where ``rank`` stands in its pass over the data (rows per DataLoader worker)."""
    return f"data_position_{rank}.json"


def checkpoint_step(path: str | Path) -> int:
    """The step of a ``checkpoint-<step>`` folder."""
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint-<step> folder.")
    return int(match.group(1))


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root`` (a run's ``checkpoints/`` folder), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_dir() and (path / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (what ``train.resume=auto`` continues from), or None."""
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


@dataclass(frozen=True)
class RunDir:
    """The paths of one run's ``output_dir``."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def export(self) -> Path:
        return self.root / EXPORT_DIR

    def export_folder(self, export_format: str) -> Path:
        """``export/dinov2_hf`` or ``export/transformers``."""
        if export_format not in EXPORT_FORMATS:
            raise ValueError(f"export format {export_format!r} is not one of {', '.join(EXPORT_FORMATS)}.")
        return self.export / export_format

    def exported_step(self) -> int | None:
        """The step of the complete export (both formats written), or None: none yet, or one interrupted."""
        marker = self.export / COMPLETE_MARKER
        try:
            return int(marker.read_text())
        except (OSError, ValueError):
            return None

    def mark_exported(self, step: int | None) -> None:
        """Record the export as complete at ``step``; None: as being rewritten (incomplete)."""
        marker = self.export / COMPLETE_MARKER
        if step is None:
            marker.unlink(missing_ok=True)
        else:
            marker.write_text(str(step))

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / checkpoint_name(step)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        return latest_checkpoint(self.checkpoints)

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunDir | None:
        """The run a ``checkpoints/checkpoint-<step>`` folder belongs to, or None for a loose checkpoint."""
        parent = Path(checkpoint).parent
        return cls(parent.parent) if parent.name == CHECKPOINTS_DIR else None

    def read_metrics(self, before_step: int | None = None) -> list[dict]:
        """The per-step records of ``metrics.jsonl`` (those before ``before_step`` when given). A torn last line (a
        kill mid-write) is dropped with a warning; an unreadable line elsewhere is an error naming file and line."""
        if not self.metrics.is_file():
            return []
        text = self.metrics.read_text()
        lines = text.splitlines()
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines) and not text.endswith("\n"):
                    logger.warning("%s: dropped its torn last line (the run was stopped while writing it).", self.metrics)
                    continue
                raise ValueError(
                    f"{self.metrics}, line {number}, is not a JSON record: {line[:80]!r}. Delete that line (or the "
                    "file: it only holds the per-step log) and rerun."
                ) from None
        return [r for r in records if before_step is None or r["step"] < before_step]

    def truncate_metrics(self, step: int) -> None:
        """Keep the records of the steps before ``step``, once each (a resumed or restarted run writes the rest);
        the file is replaced atomically, so a kill now cannot tear it."""
        if not self.metrics.is_file():
            return
        kept: dict[int, dict] = {}
        for record in self.read_metrics(before_step=step):
            kept.setdefault(record["step"], record)
        temporary = self.metrics.with_name(f".{self.metrics.name}.tmp")
        temporary.write_text("".join(json.dumps(r) + "\n" for r in kept.values()))
        os.replace(temporary, self.metrics)

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics, "a") as file:
            file.write(json.dumps(record) + "\n")


# -- one checkpoint ---------------------------------------------------------------------------------


def is_checkpoint(folder: str | Path) -> bool:
    """Whether ``folder`` is a training checkpoint of ours (it has the trainer state)."""
    return (Path(folder) / TRAINER_STATE_FILE).is_file()


def has_recipe(folder: str | Path) -> bool:
    """Whether ``folder`` carries a run's recipe: a checkpoint, or a published ``dinov2_hf/`` folder."""
    return (Path(folder) / CONFIG_FILE).is_file()


def has_weights(folder: str | Path) -> bool:
    """Whether ``folder`` holds unsharded weights or an FSDP2 run's ``sharded/`` state."""
    folder = Path(folder)
    return (folder / WEIGHTS_FILE).is_file() or (folder / SHARDED_DIR).is_dir()


def is_published(folder: str | Path) -> bool:
    """Whether ``folder`` is a published backbone with its heads (the ``dinov2_hf/`` folder of a pushed repo)."""
    return (Path(folder) / HEADS_FILE).is_file()


def write_trainer_state(folder: Path, state: dict) -> None:
    (folder / TRAINER_STATE_FILE).write_text(json.dumps(state))


def read_trainer_state(checkpoint: str | Path) -> dict:
    path = Path(checkpoint) / TRAINER_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint (no {TRAINER_STATE_FILE}).")
    return json.loads(path.read_text())


def write_data_position(folder: Path, rank: int, position: dict) -> None:
    (folder / data_position_file(rank)).write_text(json.dumps(position))


def read_data_position(checkpoint: str | Path, rank: int) -> dict | None:
    """``rank``'s data position in a checkpoint; None for checkpoints written before positions were saved."""
    path = Path(checkpoint) / data_position_file(rank)
    return json.loads(path.read_text()) if path.is_file() else None


def write_recipe(folder: Path, config: TrainConfig) -> None:
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def read_recipe(folder: str | Path) -> TrainConfig:
    """The :class:`TrainConfig` a checkpoint (or a published ``dinov2_hf/`` folder) was trained with."""
    return load_train_config(Path(folder) / CONFIG_FILE)


def final_crop_size(config: TrainConfig, steps: int) -> int:
    """The global crop size of the last of ``steps`` optimizer steps: the resolution the exported backbone
    ended at (the adaptation phase's once a step of it ran, else the main phase's)."""
    adapted = config.adaptation.steps > 0 and steps > config.main_steps
    return config.adaptation.global_crops_size if adapted else config.crops.global_crops_size


def ema_part(config: TrainConfig) -> str:
    """The checkpoint part that is exported: the EMA teacher, or a distilled student's spare EMA."""
    return "student_ema" if config.distill.teacher else "teacher"


@dataclass
class EMAWeights:
    """The exported part of a checkpoint: backbone, the other EMA weights (DINO/iBOT heads or distillation
    projections, keyed as in the EMA module) and the global crop size the run ended at."""

    backbone: torch.nn.Module
    heads: dict[str, torch.Tensor]
    crop_size: int
    step: int


def read_ema(checkpoint: str | Path, config: TrainConfig | None = None) -> EMAWeights:
    """The exported backbone (EMA) of a checkpoint with its heads, read from ``model.safetensors`` or from
    an FSDP2 run's ``sharded/`` folder, in this one process. ``config`` defaults to the checkpoint's recipe."""
    from safetensors import safe_open

    from ..modeling import Dinov2HFModel
    from ..objective.meta_arch import build_student_config
    from .parallelize import read_sharded

    checkpoint = Path(checkpoint)
    config = config if config is not None else read_recipe(checkpoint)
    part = ema_part(config)
    if (checkpoint / WEIGHTS_FILE).is_file():
        with safe_open(checkpoint / WEIGHTS_FILE, framework="pt") as file:  # the EMA part only
            state = {key: file.get_tensor(key) for key in file.keys() if key.startswith(f"{part}.")}
    elif (checkpoint / SHARDED_DIR).is_dir():
        state = read_sharded(checkpoint / SHARDED_DIR, f"{part}.")
    else:
        raise FileNotFoundError(f"{checkpoint} has neither {WEIGHTS_FILE} nor {SHARDED_DIR}/: not a complete checkpoint.")
    backbone = Dinov2HFModel(build_student_config(config))
    prefix = f"{part}.backbone."
    backbone.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    heads = {k[len(part) + 1 :]: v for k, v in state.items() if not k.startswith(prefix)}
    step = read_trainer_state(checkpoint)["step"]
    return EMAWeights(backbone.eval(), heads, final_crop_size(config, step), step)
