"""Training: the run's on-disk format, checkpoints, parallelism, the trainer and its components."""

from .checkpoint import atomic_checkpoint, prune_checkpoints
from .run_dir import RunDir, latest_checkpoint, list_checkpoints, read_ema

__all__ = ["RunDir", "atomic_checkpoint", "latest_checkpoint", "list_checkpoints", "prune_checkpoints", "read_ema"]
