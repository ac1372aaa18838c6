"""Resume cost of the trainer's data position: time to the first batch after resuming at a fraction of a pass.

``replay`` is how the trainer resumed before issue 15: it iterates the DataLoader from the start of the pass,
decoding and cropping every image it skips. ``skip`` is how it resumes now: each DataLoader worker skips the
rows it had consumed before decoding them (crops are seeded per row), and the batches are put back in the
uninterrupted order. Both give the same next batch, which the script checks.

    python scripts/bench_resume.py --out benchmarks/bench_resume_cifar_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from dinov2_hf.data.position import DataPosition
from dinov2_hf.training.batches import Batches
from dinov2_hf.training.config import load_train_config

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def replay(batches: Batches, crops, skipped: int) -> tuple[dict, float, DataPosition]:
    """Iterate the pass from its start, dropping ``skipped`` batches (the old resume); the next batch, the
    seconds to it and the position the dropped batches make (what a checkpoint holds)."""
    start, position = time.perf_counter(), DataPosition()
    for index, batch in enumerate(batches.loader(0, crops)):
        if index == skipped:
            return batch, time.perf_counter() - start, position
        position.advance(int(batch["worker"][0]), int(batch["rows"][-1]))
    raise RuntimeError("the pass ended before the position")


def resume(batches: Batches, crops, position: DataPosition) -> tuple[dict, float]:
    """The next batch after ``position`` without replaying the pass (the new resume), and the seconds to it."""
    start = time.perf_counter()
    loader = iter(batches.loader(0, crops, position))
    batch = next(loader)
    seconds = time.perf_counter() - start  # before the loader is dropped: shutting its workers down is not resuming
    return batch, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(CIFAR / "train-*.parquet"))
    parser.add_argument("--images", type=int, default=50_000, help="images in one pass (50,000 CIFAR-10 training images)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.9])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_train_config("cifar10", [
        f"data.source={args.data}", f"train.batch_size_per_device={args.batch}", f"train.num_workers={args.workers}",
        "train.mixed_precision=no",
    ])
    batches = Batches(config, Accelerator(cpu=True))
    results = []
    for fraction in args.fractions:
        skipped = int(fraction * args.images) // args.batch
        replayed, replay_seconds, position = replay(batches, config.crops, skipped)
        gc.collect()  # the replayed loader's workers are shut down before the resume is timed
        resumed, skip_seconds = resume(batches, config.crops, position)
        same = all(torch.equal(resumed[k], replayed[k]) for k in ("global_crops", "local_crops", "rows", "worker"))
        results.append({"fraction": fraction, "batches_skipped": skipped, "images_skipped": skipped * args.batch,
                        "rows_per_worker": position.rows,
                        "replay_seconds": round(replay_seconds, 2), "skip_seconds": round(skip_seconds, 2),
                        "speedup": round(replay_seconds / skip_seconds, 1), "same_next_batch": same})
        print(json.dumps(results[-1]), flush=True)
        if not same:
            raise SystemExit("the resumed and the replayed pass disagree")
    record = {"benchmark": "resume", "data": args.data, "batch_size": args.batch, "num_workers": args.workers,
              "crops": {"global": config.crops.global_crops_size, "local": config.crops.local_crops_size,
                        "local_number": config.crops.local_crops_number},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "load_average": os.getloadavg()},
              "results": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
