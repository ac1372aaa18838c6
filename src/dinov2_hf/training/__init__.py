"""Training infrastructure: checkpoints (the trainer, parallelism and logging follow)."""

from .checkpoint import atomic_checkpoint, latest_checkpoint, list_checkpoints, prune_checkpoints

__all__ = ["atomic_checkpoint", "latest_checkpoint", "list_checkpoints", "prune_checkpoints"]
