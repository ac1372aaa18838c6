"""Two gloo ranks, each stepping on half of a global batch through DDP, equal one process stepping on
the whole batch: same losses (mean over ranks), same student and teacher after three steps.

This is the trainer's DDP configuration (``broadcast_buffers=False``: the centering buffers hold each
rank's own pending batch sum until their all-reduce). Two terms are per-rank by design, as in the
official code: KoLeo (over each rank's own images; off here) and the iBOT center (the mean over ranks
of each rank's mean over its masked patches; both halves get the same masks here, so that equals the
global mean).
"""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_objective import fake_batch, tiny_config

from dinov2_hf.data.collate import MultiCropCollator
from dinov2_hf.objective import DinoSettings, SSLMetaArch, build_schedules, param_groups
from dinov2_hf.objective.step import training_step

# Slow; conftest's scheduler runs the whole module on one worker (its module-scoped fixture starts processes).
pytestmark = pytest.mark.slow

STEPS, IMAGES = 3, 8


def config(centering: str):
    return tiny_config(
        centering=centering, dino=DinoSettings(head_n_prototypes=64, head_hidden_dim=32, head_bottleneck_dim=16, koleo_loss_weight=0.0)
    )


def half(batch: dict, rank: int, world: int) -> dict:
    """Rank ``rank``'s images of a crop-major collated batch, masks included."""
    n = IMAGES // world
    images = torch.arange(rank * n, (rank + 1) * n)
    n_local = len(batch["local_crops"]) // IMAGES
    global_rows = torch.cat([images + crop * IMAGES for crop in range(2)])
    local_rows = torch.cat([images + crop * IMAGES for crop in range(n_local)])
    part = {"global_crops": batch["global_crops"][global_rows], "local_crops": batch["local_crops"][local_rows]}
    part.update(MultiCropCollator.mask_batch(batch["masks"][global_rows], batch["upperbound"]))
    return part


def global_batch(config) -> dict:
    """A collated batch of IMAGES images whose second half reuses the first half's masks."""
    batch = fake_batch(config, IMAGES)
    masks = batch["masks"].clone()
    n = IMAGES // 2
    for crop in range(2):
        masks[crop * IMAGES + n : (crop + 1) * IMAGES] = masks[crop * IMAGES : crop * IMAGES + n]
    batch.update(MultiCropCollator.mask_batch(masks, batch["upperbound"]))
    return batch


def run(arch: SSLMetaArch, batch: dict, model=None) -> list[dict]:
    optimizer = torch.optim.AdamW(param_groups(arch.student))
    schedules = build_schedules(arch.config.schedule, IMAGES)
    return [training_step(arch, optimizer, batch, schedules, 2000 + step, 3.0, model=model) for step in range(STEPS)]


def _centering_run(rank: int, centering: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    arch = SSLMetaArch(config(centering)).train()
    ddp = DistributedDataParallel(arch, broadcast_buffers=False)
    records = run(arch, half(global_batch(arch.config), rank, 2), model=ddp)
    arch.apply_pending_center_updates()  # pending sums are rank-local until folded in
    return {"records": records, "state": {k: v.clone() for k, v in arch.state_dict().items()}}


def _worker(rank: int, init_file: str, results: dict) -> None:
    """Every two-rank case of this module in one spawn (a spawned process imports torch and transformers anew)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        for centering in ("softmax_center", "sinkhorn_knopp"):
            results[(rank, centering)] = _centering_run(rank, centering)
        _accumulating_runs(rank, results)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        results = mp.Manager().dict()
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), results), nprocs=2, join=True)
        return dict(results)


def check(centering: str, two_ranks: dict) -> None:
    torch.manual_seed(0)
    arch = SSLMetaArch(config(centering)).train()
    single = run(arch, global_batch(arch.config))
    arch.apply_pending_center_updates()
    results = {rank: two_ranks[(rank, centering)] for rank in range(2)}
    for step in range(STEPS):
        for key in ("loss", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss"):
            two = (results[0]["records"][step][key] + results[1]["records"][step][key]) / 2
            assert abs(two - single[step][key]) < 1e-4 * max(1.0, abs(single[step][key])), (centering, step, key, two, single[step][key])
    state = arch.state_dict()
    for name, value in results[0]["state"].items():
        torch.testing.assert_close(value, state[name], rtol=1e-4, atol=1e-5, msg=f"{centering}: {name}")
        torch.testing.assert_close(results[1]["state"][name], value, rtol=0, atol=0, msg=f"ranks differ: {name}")


def test_two_ranks_equal_one_process_softmax_center(two_ranks):
    check("softmax_center", two_ranks)


def test_two_ranks_equal_one_process_sinkhorn_knopp(two_ranks):
    check("sinkhorn_knopp", two_ranks)


def _accumulating_runs(rank: int, results: dict) -> None:
    """Two micro-batches per step on each rank, with and without ``no_gradient_sync``; gradient all-reduces counted."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    from dinov2_hf.training.parallelize import no_gradient_sync

    for skip_sync in (True, False):
        torch.manual_seed(0)
        arch = SSLMetaArch(config("softmax_center")).train()
        ddp = DistributedDataParallel(arch, broadcast_buffers=False)
        buckets = []

        def counting_allreduce(group, bucket, buckets=buckets):
            buckets.append(bucket.index())
            return default_hooks.allreduce_hook(group, bucket)

        ddp.register_comm_hook(None, counting_allreduce)
        optimizer = torch.optim.AdamW(param_groups(arch.student))
        schedules = build_schedules(arch.config.schedule, IMAGES)
        micro_batches = [fake_batch(arch.config, IMAGES // 2, seed=2 * rank + i) for i in range(2)]
        no_sync = (lambda ddp=ddp: no_gradient_sync(ddp)) if skip_sync else None
        records = [training_step(arch, optimizer, micro_batches, schedules, 2000 + step, 3.0, model=ddp, no_sync=no_sync)
                   for step in range(STEPS)]
        arch.apply_pending_center_updates()
        results[(rank, skip_sync)] = {"records": records, "buckets": buckets,
                                      "state": {k: v.clone() for k, v in arch.state_dict().items()}}


def test_gradient_accumulation_reduces_gradients_once_per_step(two_ranks):
    """``no_gradient_sync`` on all micro-batches but the last: the same update as reducing after each
    micro-batch, with one gradient all-reduce per bucket and optimizer step instead of one per micro-batch."""
    for rank in range(2):
        once, every = two_ranks[(rank, True)], two_ranks[(rank, False)]
        buckets = len(set(once["buckets"]))
        assert len(once["buckets"]) == STEPS * buckets and len(every["buckets"]) == 2 * STEPS * buckets
        for a, b in zip(once["records"], every["records"]):
            assert abs(a["loss"] - b["loss"]) < 1e-6 * max(1.0, abs(b["loss"]))
        for name, value in once["state"].items():
            torch.testing.assert_close(value, every["state"][name], rtol=1e-5, atol=1e-6, msg=name)
