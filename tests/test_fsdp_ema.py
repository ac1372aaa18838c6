"""The EMA update runs unchanged on FSDP2 shards (two gloo ranks on CPU)."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinov2_hf.data.transforms import MultiCropSettings
from dinov2_hf.objective import DinoSettings, IbotSettings, ModelSettings, SSLConfig, SSLMetaArch


def tiny_arch() -> SSLMetaArch:
    torch.manual_seed(0)
    config = SSLConfig(
        model=ModelSettings(preset="tiny", drop_path_rate=0.0),
        crops=MultiCropSettings(global_crops_size=56, local_crops_size=28, local_crops_number=2),
        dino=DinoSettings(head_n_prototypes=64, head_hidden_dim=32, head_bottleneck_dim=16),
        ibot=IbotSettings(head_n_prototypes=64),
    )
    arch = SSLMetaArch(config)
    with torch.no_grad():
        for p in arch.student.parameters():
            p.add_(torch.randn_like(p))
    return arch


def _worker(rank: int, init_file: str, results: dict) -> None:
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        arch = tiny_arch()
        for part in (arch.student, arch.teacher):
            for layer in part["backbone"].encoder.layer:
                fully_shard(layer)
            for module in part.values():
                fully_shard(module)
        arch.update_teacher(0.7)
        full = {name: p.full_tensor().clone() for name, p in arch.teacher.named_parameters()}
        sharded = sum(1 for p in arch.teacher.parameters() if hasattr(p, "to_local"))
        results[rank] = {"teacher": full, "sharded": sharded}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ema_on_fsdp2_shards_equals_unsharded():
    reference = tiny_arch()
    reference.update_teacher(0.7)
    with tempfile.TemporaryDirectory() as tmp:
        results = mp.Manager().dict()
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), results), nprocs=2, join=True)
        results = dict(results)
    expected = dict(reference.teacher.named_parameters())
    assert results[0]["sharded"] == len(expected)  # every teacher parameter was a DTensor shard
    for name, value in results[0]["teacher"].items():
        assert torch.equal(value, expected[name].detach()), name
