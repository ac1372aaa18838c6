"""One DINOv2 iteration on a single process: the reference loop body the trainer builds on."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection

import torch

from ..data.transforms import BatchedPhotometric, crops_from_boxes
from .meta_arch import SSLMetaArch
from .param_groups import apply_schedules
from .schedules import Schedules


def augment_batch(
    batch: dict, photometric: BatchedPhotometric, device: torch.device | str, generator: torch.Generator | None = None
) -> dict:
    """Move a collated batch to ``device`` and run the photometric augmentations there (after cutting the crops,
    for a batch of decoded images and their boxes: ``crops.resize=device``)."""
    crop_boxes = batch.get("crop_boxes")  # stays on the host: crops_from_boxes reads the sizes from it
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items() if k != "crop_boxes"}
    if crop_boxes is not None:
        batch["global_crops"], batch["local_crops"] = crops_from_boxes(batch.pop("images"), crop_boxes)
    batch["global_crops"] = photometric.global_crops(batch["global_crops"], generator)
    batch["local_crops"] = photometric.local_crops(batch["local_crops"], generator)
    return batch


def training_step(
    arch: SSLMetaArch,
    optimizer: torch.optim.Optimizer,
    batch: dict | list[dict],
    schedules: Schedules,
    iteration: int,
    clip_grad: float,
    autocast_dtype: torch.dtype | None = None,
    model: Callable | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    frozen: Collection[str] = (),
) -> dict[str, float]:
    """Schedules -> forward -> backward -> per-module clipping -> optimizer step -> EMA teacher.

    ``batch`` may be a list of micro-batches (gradient accumulation): each runs forward and backward
    with its loss divided by their number, then one clipping, optimizer step and EMA update follow;
    the returned losses and metrics are their means; ``no_sync`` (e.g. ``training.parallelize.no_gradient_sync``)
    is entered around every micro-batch but the last, so that data-parallel gradients are reduced once per
    optimizer step. ``model``, ``backward`` and ``autocast`` default to plain PyTorch; the trainer passes
    Accelerate's wrapped model, ``accelerator.backward`` and ``accelerator.autocast``. ``frozen``: student parts
    (``backbone`` under ``train.freeze_backbone_steps``) that get no update this step: their gradients are dropped
    after backward (data-parallel wrappers still reduce them), so AdamW skips them (no step, no weight decay, no
    moments) and their EMA stays. Returns the losses, health metrics, gradient norms and schedule values as floats.
    """
    micro_batches = batch if isinstance(batch, list) else [batch]
    values = schedules.at(iteration)
    apply_schedules(optimizer, values["lr"], values["weight_decay"], values["last_layer_lr"])
    optimizer.zero_grad(set_to_none=True)
    outputs = []
    for index, micro_batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
        if autocast is None:
            device_type = micro_batch["global_crops"].device.type
            context = torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None)
        else:
            context = autocast()
        with sync:
            with context:
                out = (model or arch)(micro_batch, teacher_temp=values["teacher_temp"])
            (backward or torch.Tensor.backward)(out["loss"] / len(micro_batches))
        outputs.append({k: v.detach() for k, v in out.items()})
    for name in frozen:
        for parameter in arch.student[name].parameters():
            parameter.grad = None
    grad_norms = arch.clip_gradients(clip_grad)
    optimizer.step()
    arch.update_teacher(values["momentum"], skip=frozen)
    out = {key: torch.stack([o[key].float() for o in outputs]).mean() for key in outputs[0]}
    scalars = {**out, **grad_norms}
    # One device-to-host copy for all scalars (one sync per step, not one per metric).
    floats = torch.stack([v.detach().float() for v in scalars.values()]).tolist()
    return {**dict(zip(scalars, floats)), **values}
