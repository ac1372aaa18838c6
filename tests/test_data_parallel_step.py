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

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_objective import fake_batch, tiny_config

from dinov2_hf.data.collate import MultiCropCollator
from dinov2_hf.objective import DinoSettings, SSLMetaArch, build_schedules, param_groups
from dinov2_hf.objective.step import training_step

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


def _worker(rank: int, init_file: str, centering: str, results: dict) -> None:
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        arch = SSLMetaArch(config(centering)).train()
        ddp = DistributedDataParallel(arch, broadcast_buffers=False)
        records = run(arch, half(global_batch(arch.config), rank, 2), model=ddp)
        arch.apply_pending_center_updates()  # pending sums are rank-local until folded in
        results[rank] = {"records": records, "state": {k: v.clone() for k, v in arch.state_dict().items()}}
    finally:
        dist.destroy_process_group()


def check(centering: str) -> None:
    torch.manual_seed(0)
    arch = SSLMetaArch(config(centering)).train()
    single = run(arch, global_batch(arch.config))
    arch.apply_pending_center_updates()
    with tempfile.TemporaryDirectory() as tmp:
        results = mp.Manager().dict()
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), centering, results), nprocs=2, join=True)
        results = dict(results)
    for step in range(STEPS):
        for key in ("loss", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss"):
            two = (results[0]["records"][step][key] + results[1]["records"][step][key]) / 2
            assert abs(two - single[step][key]) < 1e-4 * max(1.0, abs(single[step][key])), (centering, step, key, two, single[step][key])
    state = arch.state_dict()
    for name, value in results[0]["state"].items():
        torch.testing.assert_close(value, state[name], rtol=1e-4, atol=1e-5, msg=f"{centering}: {name}")
        torch.testing.assert_close(results[1]["state"][name], value, rtol=0, atol=0, msg=f"ranks differ: {name}")


def test_two_ranks_equal_one_process_softmax_center():
    check("softmax_center")


def test_two_ranks_equal_one_process_sinkhorn_knopp():
    check("sinkhorn_knopp")
