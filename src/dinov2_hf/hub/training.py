"""What the Hub layer adds to a training run: model cards beside the export, and ``hub.push_to_hub``.

The trainer knows nothing of the Hub; it calls these callbacks after its export::

    trainer = Trainer(config, callbacks=hub_callbacks(config))  # checks the push settings and token now

``dinov2-hf train`` / ``train.py`` and the notebooks build their trainers this way.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..training import run_dir
from ..training.config import HubSettings, TrainConfig
from .model_card import training_model_card
from .push import PushResult, check_target, push_checkpoint, resolve_token

logger = logging.getLogger(__name__)


class ModelCardWriter:
    """Writes a model card (recipe, data, steps, compute, last metrics) into each export folder."""

    def on_export(self, trainer, export_dir: Path, last_record: dict | None) -> None:
        if not trainer.accelerator.is_main_process:
            return
        compute = trainer.compute_record()
        for export_format in run_dir.EXPORT_FORMATS:
            folder = export_dir / export_format
            card = training_model_card(trainer.config, trainer.step, last_record, export_format, folder, compute)
            card.save(folder / "README.md")


class PushToHub:
    """Publishes the export when training ends (main process). Built where the run starts: an invalid target
    or a missing token (or offline mode) stops the run before its first step. A failed push is logged and
    kept in ``error``; the export and checkpoints stay, and ``dinov2-hf push OUTPUT_DIR REPO_ID`` retries."""

    def __init__(self, settings: HubSettings) -> None:
        check_target(settings.repo_id, settings.revision or None, settings.create_pr)
        resolve_token()
        self.settings = settings
        self.result: PushResult | None = None
        self.error: Exception | None = None

    def on_export(self, trainer, export_dir: Path, last_record: dict | None) -> None:
        if not trainer.accelerator.is_main_process:
            return
        hub, output_dir = self.settings, trainer.output_dir
        try:
            self.result, _ = push_checkpoint(
                output_dir, hub.repo_id, private=hub.private, revision=hub.revision or None, create_pr=hub.create_pr,
                fmt=hub.format, commit_message=hub.commit_message or None,
            )
            logger.info("Pushed %s to %s", export_dir, self.result.commit_url)
        except Exception as error:  # the export must survive any push failure
            self.error = error
            logger.error("Push to %s failed: %s. The export is in %s; retry with `dinov2-hf push %s %s`.",
                         hub.repo_id, error, export_dir, output_dir, hub.repo_id)


def hub_callbacks(config: TrainConfig) -> list:
    """The cards writer, plus the pusher when ``hub.push_to_hub`` is set (its checks run now)."""
    callbacks: list = [ModelCardWriter()]
    if config.hub.push_to_hub:
        callbacks.append(PushToHub(config.hub))
    return callbacks


def push_callback(callbacks: list) -> PushToHub | None:
    """The :class:`PushToHub` among ``callbacks``, if any."""
    return next((c for c in callbacks if isinstance(c, PushToHub)), None)
