"""Centering and Sinkhorn-Knopp over two gloo ranks equal one process on the concatenated batch."""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinov2_hf.losses import DINOLoss, iBOTPatchLoss, sinkhorn_knopp


def _worker(rank: int, world_size: int, init_file: str, data: dict, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        logits = data["logits"].chunk(world_size)[rank]
        patches = data["patches"][data["patch_split"][rank] : data["patch_split"][rank + 1]]
        sk = sinkhorn_knopp(logits, teacher_temp=0.3)
        ibot_sk = iBOTPatchLoss(logits.shape[1]).sinkhorn_knopp_teacher(patches, 0.3, torch.tensor([len(patches)]))
        loss = DINOLoss(logits.shape[1])
        for step in range(2):
            loss.softmax_center_teacher(logits + step, 0.1)
            loss.update_center(logits + step)
        loss.softmax_center_teacher(logits, 0.1)
        results[rank] = {"sk": sk, "ibot_sk": ibot_sk, "center": loss.center.clone()}
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process():
    torch.manual_seed(0)
    data = {"logits": torch.randn(8, 6), "patches": torch.randn(7, 6), "patch_split": [0, 3, 7]}
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), data, results), nprocs=2, join=True)
        results = dict(results)
    full_sk = sinkhorn_knopp(data["logits"], teacher_temp=0.3)
    torch.testing.assert_close(torch.cat([results[0]["sk"], results[1]["sk"]]), full_sk)
    full_ibot = iBOTPatchLoss(6).sinkhorn_knopp_teacher(data["patches"], 0.3, torch.tensor([7]))
    torch.testing.assert_close(torch.cat([results[0]["ibot_sk"], results[1]["ibot_sk"]]), full_ibot)
    single = DINOLoss(6)
    for step in range(2):
        single.softmax_center_teacher(data["logits"] + step, 0.1)
        single.update_center(data["logits"] + step)
    single.softmax_center_teacher(data["logits"], 0.1)
    torch.testing.assert_close(results[0]["center"], single.center)
    torch.testing.assert_close(results[1]["center"], single.center)
