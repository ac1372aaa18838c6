"""FSDP2 for the meta-architecture, the same on GPUs and CPUs; sharded checkpoints; full-state export.

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
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn


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
