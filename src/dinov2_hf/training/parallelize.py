"""Parallelism for the meta-architecture: activation checkpointing, compiled blocks, FSDP2 (the same on GPUs
and CPUs) or DDP, in one place (:func:`parallelize`); sharded checkpoints; full-state export.

On GPUs, ``accelerate launch --config_file examples/accelerate/fsdp2.yaml`` makes Accelerate's FSDP2
plugin shard the model in ``prepare``: ``fully_shard`` on every transformer block, then on the root
module. Accelerate enables that plugin on accelerators only, so on CPU processes launched with the
same config :func:`shard_meta_arch` applies the same ``fully_shard`` calls itself, with the plugin's
settings. Student and teacher are sharded identically (block by block, then the root unit), so the
EMA update pairs local shards one to one.

Sharded checkpoints go through ``torch.distributed.checkpoint`` (each rank writes its shards; loading
re-shards), whoever applied ``fully_shard``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from .config import TrainSettings


def fsdp_requested() -> bool:
    """True when ``accelerate launch`` was given an FSDP config (it exports ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def shard_meta_arch(model: nn.Module, plugin=None) -> nn.Module:
    """``fully_shard`` each transformer block of student and teacher, then the root, in place.

    ``plugin`` is Accelerate's ``FullyShardedDataParallelPlugin`` (read from the launch config when
    None): its ``transformer_cls_names_to_wrap`` (default: the backbone's ``_no_split_modules``) and
    ``reshard_after_forward`` are honoured.
    """
    from torch.distributed.fsdp import fully_shard

    if plugin is None:
        from accelerate import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()
    names = set(plugin.transformer_cls_names_to_wrap or model.student["backbone"]._no_split_modules)
    reshard = plugin.reshard_after_forward if isinstance(plugin.reshard_after_forward, bool) else True
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    if not blocks:
        raise ValueError(f"FSDP: no module of class {sorted(names)} to wrap; set fsdp_transformer_layer_cls_to_wrap: Dinov2HFLayer.")
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def full_root_params(model: nn.Module) -> Iterator[None]:
    """Gather the root unit's parameters (embeddings, norms, heads) for calls outside ``forward``,
    such as the kNN monitor calling the teacher backbone. Collective: every rank must enter."""
    if not is_sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module) -> Iterator[None]:
    """Keep this micro-batch's gradients local (accumulated, not reduced): DDP's ``no_sync``, FSDP2's
    ``set_requires_gradient_sync(False)``; nothing to do for one process. The step's last micro-batch runs
    outside it and reduces the accumulated gradients once."""
    if is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer shards of every rank into the DCP folder ``folder`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Inverse of :func:`save_sharded`, re-sharding onto the current ranks (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: the checkpoint was written by an unsharded run.")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_state_dict(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The full (unsharded) tensors under ``prefix``, on CPU, prefix removed. Collective: every rank
    must call it; rank 0 gets the tensors, the other ranks an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def read_sharded(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The full tensors under ``model.<prefix>`` of a DCP folder written by :func:`save_sharded`, read in this
    one process (DCP needs no process group to read; shapes and dtypes come from its metadata)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    wanted = {key[len("model.") :]: entry for key, entry in metadata.items() if key.startswith(f"model.{prefix}")}
    state = {"model": {key: torch.empty(entry.size, dtype=entry.properties.dtype) for key, entry in wanted.items()}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group": reading in one process is what we want
        dcp.load(state, checkpoint_id=str(folder))
    return state["model"]


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ...
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def distributed_on_cpu() -> bool:
    """Whether ``accelerate launch`` started several processes on a machine without an accelerator.

    Accelerate would make each a lone process (its CPU launch flags give one process), so they become gloo
    ranks (``Accelerator(cpu=True)``); its FSDP plugin is accelerator-only, so :func:`parallelize` shards such
    ranks itself with the same ``fully_shard`` calls.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator()


def parallelize(
    arch: nn.Module,
    accelerator: Accelerator,
    settings: TrainSettings,
    build_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
) -> tuple[nn.Module, torch.optim.Optimizer, bool]:
    """Activation checkpointing -> compiled blocks -> FSDP2 or DDP, in that order, on the meta-architecture.

    ``build_optimizer`` is called on the (possibly sharded) module, so that the optimizer holds the parameters
    it will update. Returns the model to call, the optimizer and whether the model is sharded.
    """
    if settings.activation_checkpointing:
        backbone = arch.student["backbone"]  # transformers >= 5.24 renamed gradient -> activation checkpointing
        (getattr(backbone, "activation_checkpointing_enable", None) or backbone.gradient_checkpointing_enable)()
    if settings.compile:
        arch.compile_blocks()
    shard_here = fsdp_requested() and distributed_on_cpu() and accelerator.num_processes > 1
    if shard_here:  # else Accelerate's plugin shards in prepare (on accelerators)
        shard_meta_arch(arch)  # before the optimizer: it must hold the sharded parameters
    optimizer = build_optimizer(arch)
    if shard_here:
        return arch, accelerator.prepare(optimizer), True  # no DDP wrapper over shards
    # Wrapped by DDP or Accelerate's FSDP2; accelerator.unwrap_model gives the meta-architecture back.
    model, optimizer = accelerator.prepare(arch, optimizer)
    return model, optimizer, accelerator.distributed_type == DistributedType.FSDP
