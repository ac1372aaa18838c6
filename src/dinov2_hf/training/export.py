"""Export of a run's result: the EMA backbone in our format and in stock transformers format."""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator
from torch import nn

from ..modeling import Dinov2HFModel
from ..modeling.save import export_transformers, save_ours
from .parallelize import full_state_dict
from .run_dir import OURS_FORMAT, STOCK_FORMAT, RunDir


def export_backbone(
    model: nn.Module, accelerator: Accelerator, sharded: bool, run: RunDir, crop_size: int, step: int
) -> Path:
    """Write the exported backbone (the teacher, or a distilled student's EMA) of ``model`` to ``run.export``,
    each format with the image processor for ``crop_size``, then mark it complete at ``step`` (a rerun of the
    finished run then has nothing to do). Collective: every process must call it."""
    arch = accelerator.unwrap_model(model)
    backbone = arch.exported_backbone
    if sharded:  # gather the full backbone (collective), then save it from the main process
        weights = full_state_dict(model, prefix=f"{arch.ema_part}.backbone.")
        if accelerator.is_main_process:
            backbone = Dinov2HFModel(backbone.config)
            backbone.load_state_dict(weights, strict=True)  # a gathered key missing must fail, not export random
    if accelerator.is_main_process:
        run.export.mkdir(parents=True, exist_ok=True)
        run.mark_exported(None)
        save_ours(backbone, run.export_folder(OURS_FORMAT), crop_size=crop_size)
        export_transformers(backbone, run.export_folder(STOCK_FORMAT), crop_size=crop_size)
        run.mark_exported(step)
    accelerator.wait_for_everyone()
    return run.export
