"""Distillation vs training from scratch (issue 7's comparison): kNN of teacher, distilled students, scratch student.

    python scripts/bench_distill.py --out benchmarks/bench_distill_cpu.json                  # small, 2 CPU cores
    python scripts/bench_distill.py --teacher-steps 5000 --student-steps 2000 --batch 128 \
        --teacher-width 384 --teacher-blocks 6 --student-width 192 --student-blocks 6 --out ...   # on a GPU

1. A teacher is pretrained with the SSL recipe (``cifar10``, shrunk by the flags) for --teacher-steps.
2. The same student architecture is trained for --student-steps, same batch, three ways: from scratch
   with the SSL recipe; distilled in paper mode (the teacher checkpoint's frozen EMA teacher with its
   heads); distilled in headless mode (the teacher's stock transformers export, CLS + patch features).
Every run reports the kNN monitor (weighted k=20 on normalised CLS of the exported backbone, the first
--knn-train images of --knn-source as memory, the next --knn-test as queries) at initialisation and at
the end, its wall time, and the final teacher entropy (1.0 = the flat collapse of the DINO head).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dinov2_hf.training.config import load_train_config  # noqa: E402
from dinov2_hf.training.trainer import Trainer  # noqa: E402

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def recipe(args, width: int, blocks: int, heads: int, steps: int, output: Path, extra: list[str] = ()) -> list[str]:
    """The ``cifar10`` recipe's overrides for one run, its schedule compressed to ``steps``."""
    return [
        f"data.source={args.data}", "data.shuffle_buffer=1000", "model.drop_path_rate=0.0",
        f"model.overrides.hidden_size={width}", f"model.overrides.num_hidden_layers={blocks}",
        f"model.overrides.num_attention_heads={heads}",
        f"dino.head_n_prototypes={args.prototypes}", f"ibot.head_n_prototypes={args.prototypes}",
        f"dino.head_hidden_dim={args.head_hidden}", f"ibot.head_hidden_dim={args.head_hidden}",
        f"crops.local_crops_number={args.local_crops}", "schedule.epochs=10", f"schedule.epoch_length={max(1, steps // 10)}",
        "schedule.warmup_epochs=1", "schedule.warmup_teacher_temp_epochs=3",
        f"train.batch_size_per_device={args.batch}", "train.num_workers=1", f"train.mixed_precision={args.precision}",
        f"train.max_steps={steps}", f"train.save_every={steps}", "train.log_with=none", f"train.output_dir={output}",
        f"monitor.source={args.knn_source}", f"monitor.every={steps}", f"monitor.train_images={args.knn_train}",
        f"monitor.test_images={args.knn_test}", "monitor.k=20", *extra,
    ]


def run(name: str, overrides: list[str]) -> dict:
    start = time.perf_counter()
    trainer = Trainer(load_train_config("cifar10", overrides))
    history = trainer.train()
    result = {"knn_init": trainer.initial_knn, "knn_final": trainer.final_knn, "steps": trainer.step,
              "wall_seconds": round(time.perf_counter() - start, 1),
              "teacher_entropy_final": history[-1].get("teacher_entropy") if history else None}
    print(f"{name}: {json.dumps(result)}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(CIFAR / "train-00000-of-00005.parquet"))
    parser.add_argument("--knn-source", default=str(CIFAR / "test-00000-of-00001.parquet"))
    parser.add_argument("--knn-train", type=int, default=2000)
    parser.add_argument("--knn-test", type=int, default=1000)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--student-steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--teacher-width", type=int, default=96)
    parser.add_argument("--teacher-blocks", type=int, default=4)
    parser.add_argument("--student-width", type=int, default=48)
    parser.add_argument("--student-blocks", type=int, default=2)
    parser.add_argument("--prototypes", type=int, default=512)
    parser.add_argument("--head-hidden", type=int, default=256)
    parser.add_argument("--local-crops", type=int, default=2)
    parser.add_argument("--precision", default="no", help="train.mixed_precision (bf16 on a GPU)")
    parser.add_argument("--workdir", default="runs/bench_distill")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if not Path(args.data).exists():
        raise SystemExit(f"--data {args.data} does not exist (CIFAR-10 parquet shards are expected in {CIFAR}).")

    work = Path(args.workdir)
    heads_per = lambda width: max(1, width // 32)  # noqa: E731  (head dim 32 keeps tiny models sensible)
    results = {"config": vars(args)}
    results["teacher"] = run("teacher", recipe(args, args.teacher_width, args.teacher_blocks, heads_per(args.teacher_width),
                                               args.teacher_steps, work / "teacher"))
    checkpoint = work / "teacher" / "checkpoints" / f"checkpoint-{args.teacher_steps}"
    student = (args.student_width, args.student_blocks, heads_per(args.student_width), args.student_steps)
    results["scratch"] = run("scratch", recipe(args, *student, work / "scratch"))
    results["distilled_heads"] = run("distilled_heads", recipe(args, *student, work / "heads",
                                                               [f"distill.teacher={checkpoint}", "distill.mode=heads"]))
    results["distilled_features"] = run("distilled_features", recipe(
        args, *student, work / "features", [f"distill.teacher={work / 'teacher' / 'export' / 'transformers'}", "distill.mode=features"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
