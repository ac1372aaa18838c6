"""A CIFAR-10 teacher that knows more than a student learns alone at CPU budget: a stand-in for a strong released model.

    OMP_NUM_THREADS=1 python scripts/make_distill_teacher.py --out tests/fixtures/cifar_teacher      # ~6 min, one thread

A small backbone (the ``cifar10_cpu`` architecture, width 96, 4 blocks, 32 px, but patch 8 by default: 16 tokens see
about 4x the images of patch 4 in the same time, which at this budget matters more; ``--patch``, ``--width``, ``--blocks``)
is trained *supervised* on CIFAR-10's 50,000 training labels: a linear classifier on the normalised CLS token, cross-entropy,
AdamW with a warm-up and a cosine decay, random crops (4-px reflected padding) and horizontal flips. Seeded and
single-threaded, so a rerun gives the same weights on the same software. The backbone (without the classifier) is
written in stock transformers format (``modeling.save.export_transformers``, float16 weights by default), so
``dinov2-hf distill --teacher FOLDER`` distils from it in the headless (feature) mode; ``teacher.json`` beside the
weights holds its kNN top-1 with the protocol of README "Small data" (weighted k=20 on the L2-normalised CLS, the
first 5,000 training images as memory, the first 1,000 test images as queries; measured on the saved weights).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from dinov2_hf.data.sources import DataSettings, load_image_stream  # noqa: E402
from dinov2_hf.data.transforms import BatchedPhotometric  # noqa: E402
from dinov2_hf.eval.features import labelled_images  # noqa: E402
from dinov2_hf.modeling import Dinov2HFModel  # noqa: E402
from dinov2_hf.modeling.loading import load_backbone  # noqa: E402
from dinov2_hf.modeling.save import export_transformers  # noqa: E402
from dinov2_hf.objective.meta_arch import build_student_config  # noqa: E402
from dinov2_hf.training.config import MonitorSettings, load_train_config  # noqa: E402
from dinov2_hf.training.monitor import KnnMonitor  # noqa: E402

CIFAR = Path(os.environ.get("DINOV2_HF_CIFAR10", Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"))


def cifar_knn_settings(cifar: Path) -> MonitorSettings:
    """The kNN protocol of README "Small data" on CIFAR-10 (also the trainer's monitor in ``bench_distill.py``)."""
    return MonitorSettings(every=1, source=str(cifar / "train-00000-of-00005.parquet"),
                           test_source=str(cifar / "test-00000-of-00001.parquet"), train_images=5000, test_images=1000, k=20)


def read_labelled(source: str, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` (default: all) images of ``source`` in file order, as uint8 (n, 3, h, w), and their labels."""
    stream = load_image_stream(DataSettings(source=source, label_column="label", shuffle_buffer=0))
    images, labels = [], []
    for image, label in labelled_images(stream, "image", "label", {"skipped": 0}):
        images.append(torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3))
        labels.append(label)
        if len(images) == count:
            break
    return torch.stack(images).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


def augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crops of the reflect-padded images and horizontal flips (uint8 in, float in [0, 1] out)."""
    n, _, h, w = images.shape
    padded = nn.functional.pad(images.float() / 255, (padding,) * 4, mode="reflect")
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator).tolist()
    crops = torch.stack([padded[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(offsets)])
    flip = torch.rand(n, generator=generator) < 0.5
    crops[flip] = crops[flip].flip(-1)
    return crops


def learning_rate(step: int, steps: int, base: float, warmup: int) -> float:
    """Linear warm-up, then a cosine decay to zero."""
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_teacher(args: argparse.Namespace) -> tuple[Dinov2HFModel, dict]:
    """The backbone trained with labels, and a summary of the run."""
    torch.manual_seed(args.seed)
    overrides = [f"model.overrides.{key}={value}" for key, value in
                 (("hidden_size", args.width), ("num_hidden_layers", args.blocks), ("num_attention_heads", args.heads),
                  ("patch_size", args.patch)) if value]
    backbone = Dinov2HFModel(build_student_config(load_train_config("cifar10_cpu", overrides)))
    classifier = nn.Linear(backbone.config.hidden_size, 10)
    parameters = [*backbone.parameters(), *classifier.parameters()]
    decay = [p for p in parameters if p.ndim >= 2]  # no weight decay on norms, biases, LayerScale
    rest = [p for p in parameters if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}])
    started = time.perf_counter()
    images, labels = read_labelled(str(CIFAR / "train-*.parquet"))
    read_seconds = time.perf_counter() - started
    normalize = BatchedPhotometric().normalize
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(images), generator=generator)
    backbone.train()
    position, losses = 0, []
    for step in range(args.steps):
        if position + args.batch > len(order):  # a new pass over the data in a new order
            order, position = torch.randperm(len(images), generator=generator), 0
        index = order[position : position + args.batch]
        position += args.batch
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        logits = classifier(backbone(normalize(augment(images[index], generator))).pooler_output)
        loss = nn.functional.cross_entropy(logits, labels[index], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(parameters, 3.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps}: loss {sum(losses[-100:]) / len(losses[-100:]):.3f}", flush=True)
    summary = {"train_images": len(images), "read_seconds": round(read_seconds, 1),
               "train_seconds": round(time.perf_counter() - started - read_seconds, 1), "final_loss": round(losses[-1], 4)}
    return backbone.eval(), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="tests/fixtures/cifar_teacher", help="the teacher's folder (stock transformers format)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--width", type=int, default=0, help="hidden size (default: cifar10_cpu's 96)")
    parser.add_argument("--blocks", type=int, default=0, help="number of blocks (default: cifar10_cpu's 4)")
    parser.add_argument("--heads", type=int, default=0, help="attention heads (default: cifar10_cpu's 3)")
    parser.add_argument("--patch", type=int, default=8, help="patch size (0: cifar10_cpu's 4)")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16", help="stored weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the same float sums on every machine)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    if not (CIFAR / "test-00000-of-00001.parquet").is_file():
        raise SystemExit(f"CIFAR-10 parquet shards not found in {CIFAR} (set DINOV2_HF_CIFAR10).")
    backbone, summary = train_teacher(args)
    out = export_transformers(backbone, args.out, crop_size=backbone.config.image_size, dtype=getattr(torch, args.dtype))
    # Measured on the saved weights, as a student will see them (rounded to --dtype, computed in float32).
    saved, _ = load_backbone(out)
    monitor = KnnMonitor(cifar_knn_settings(CIFAR), backbone.config.image_size)
    knn = monitor(saved.float(), torch.device("cpu"))
    weights = sum(p.stat().st_size for p in out.iterdir())
    result = {"knn_top1": round(knn, 4), **summary, "folder_bytes": weights,
              "architecture": {k: getattr(backbone.config, k) for k in ("patch_size", "hidden_size", "num_hidden_layers",
                                                                          "num_attention_heads", "image_size")},
              "args": {k: v for k, v in vars(args).items() if k != "out"}, "torch": torch.__version__}
    (out / "teacher.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
