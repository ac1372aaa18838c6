"""A short DINOv2 run on CIFAR-10 on one device: loss curve, health metrics and kNN accuracy.

    python scripts/gpu_ssl_check.py --data ../shared/data/cifar10 --steps 1000 --out ssl_check.json

The objective exactly as the trainer will run it (multi-crop geometry in DataLoader workers,
photometric augmentation batched on the device, packed student pass, EMA teacher, official
schedules) on the ``cifar10`` recipe, then a weighted kNN (k=20, T=0.07, cosine on the normalised
CLS) of the teacher backbone on the test split against the same architecture at initialisation.
This is a check of the science on real data until the trainer (issue 4) exists, not the trainer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dinov2_hf.data import open_rgb  # noqa: E402
from dinov2_hf.data.collate import MultiCropCollator  # noqa: E402
from dinov2_hf.data.transforms import BatchedPhotometric, MultiCropGeometry  # noqa: E402
from dinov2_hf.eval import knn_classify  # noqa: E402
from dinov2_hf.objective import build_schedules, param_groups  # noqa: E402
from dinov2_hf.objective.meta_arch import build_meta_arch  # noqa: E402
from dinov2_hf.objective.step import augment_batch, training_step  # noqa: E402
from dinov2_hf.training.config import load_train_config  # noqa: E402


def read_split(folder: Path, prefix: str) -> tuple[list[bytes], torch.Tensor]:
    images, labels = [], []
    for path in sorted(folder.glob(f"{prefix}-*.parquet")):
        table = pq.read_table(path, columns=["image", "label"])
        images += [row["bytes"] for row in table.column("image").to_pylist()]
        labels += table.column("label").to_pylist()
    if not images:
        raise FileNotFoundError(f"No {prefix}-*.parquet shards in {folder}")
    return images, torch.tensor(labels)


class CropDataset(torch.utils.data.Dataset):
    def __init__(self, images: list[bytes], geometry: MultiCropGeometry) -> None:
        self.images, self.geometry = images, geometry

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return self.geometry(open_rgb(self.images[index]))


@torch.no_grad()
def embed(backbone, images: list[bytes], device: str, batch_size: int = 1024) -> torch.Tensor:
    """Teacher CLS of every image at its native 32 px (knn_classify L2-normalises)."""
    normalize = BatchedPhotometric().normalize
    features = []
    for start in range(0, len(images), batch_size):
        arrays = [torch.from_numpy(np.asarray(open_rgb(b)).copy()) for b in images[start : start + batch_size]]
        x = normalize(torch.stack(arrays).permute(0, 3, 1, 2).to(device).float().div_(255))
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            features.append(backbone(x).pooler_output.float())
    return torch.cat(features)


def seed_workers(geometry: MultiCropGeometry, collator: MultiCropCollator):
    """A DataLoader ``worker_init_fn`` giving every worker its own crop and mask RNG (from the loader's per-worker,
    per-epoch seed): without it each worker starts from a copy of the same RNG and they all draw the same crops
    and masks."""

    def init(worker_id: int) -> None:
        seed = torch.utils.data.get_worker_info().seed
        geometry.rng.seed(seed)
        collator.rng.seed(seed + 1)  # the mask generator draws from this RNG too

    return init


def knn_accuracy(train, train_labels, test, test_labels) -> float:
    return knn_classify(train, train_labels, test, test_labels, ks=(20,), num_classes=10)[20]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--override", nargs="*", default=[], help="recipe overrides, key=value")
    parser.add_argument("--knn-every", type=int, default=0, help="also measure kNN every N steps (0: start and end only)")
    parser.add_argument("--knn-images", type=int, default=0, help="use the first N train and N/2 test images for kNN (0: all)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    torch.manual_seed(0)
    epoch_length = max(args.steps // 10, 1)
    config = load_train_config(
        "cifar10",
        [f"schedule.epoch_length={epoch_length}", "schedule.epochs=10", "schedule.warmup_epochs=1",
         "schedule.warmup_teacher_temp_epochs=3", f"train.batch_size_per_device={args.batch_size}", *args.override],
    )
    train_images, train_labels = read_split(args.data, "train")
    test_images, test_labels = read_split(args.data, "test")
    patch = config.model.overrides.get("patch_size", 14)
    geometry, collator = MultiCropGeometry(config.crops), MultiCropCollator(config.crops.global_crops_size, patch)
    loader = torch.utils.data.DataLoader(
        CropDataset(train_images, geometry), batch_size=args.batch_size, shuffle=True, drop_last=True,
        num_workers=args.workers, collate_fn=collator, worker_init_fn=seed_workers(geometry, collator),
        persistent_workers=args.workers > 0,
    )
    device = args.device
    arch = build_meta_arch(config).to(device).train()
    n_train = args.knn_images or len(train_images)
    n_test = args.knn_images // 2 or len(test_images)

    def teacher_knn() -> float:
        backbone = arch.teacher["backbone"]
        return knn_accuracy(embed(backbone, train_images[:n_train], device), train_labels[:n_train],
                            embed(backbone, test_images[:n_test], device), test_labels[:n_test])

    initial_knn = teacher_knn()
    photometric = BatchedPhotometric.for_crops(config.crops.global_crops_size, config.crops.blur, config.crops.blur_reference_size)
    optimizer = torch.optim.AdamW(param_groups(arch.student, config.optim.layerwise_decay, config.optim.patch_embed_lr_mult),
                                  betas=(config.optim.adamw_beta1, config.optim.adamw_beta2))
    schedules = build_schedules(config.schedule, args.batch_size)
    history, step, start = [], 0, time.perf_counter()
    while step < args.steps:
        for batch in loader:
            batch = augment_batch(batch, photometric, device)
            dtype = torch.bfloat16 if device.startswith("cuda") else None
            out = training_step(arch, optimizer, batch, schedules, step, config.optim.clip_grad, autocast_dtype=dtype)
            if step % max(args.steps // 20, 1) == 0 or step == args.steps - 1:
                record = {"step": step, **{k: round(v, 4) for k, v in out.items()}}
                if args.knn_every and step and step % args.knn_every == 0:
                    record["knn_top1"] = teacher_knn()
                history.append(record)
                print(json.dumps(record), flush=True)
            step += 1
            if step >= args.steps:
                break
    seconds = time.perf_counter() - start
    final_knn = teacher_knn()
    report = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "steps": args.steps, "batch_size": args.batch_size, "train_images": len(train_images), "overrides": args.override,
        "seconds": round(seconds, 1), "img_per_s": round(args.steps * args.batch_size / seconds, 1),
        "knn_top1_init": initial_knn, "knn_top1_final": final_knn, "history": history,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "history"}))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
