"""Distillation vs training from scratch (issue 7's comparison): kNN of teacher, distilled students, scratch student.

    python scripts/bench_distill.py --out benchmarks/bench_distill_digits_cpu.json     # built-in digits, 2 CPU cores, ~5 min
    python scripts/bench_distill.py --recipe cifar10 --out ...                            # CIFAR-10, tiny (learns little on a CPU)
    python scripts/bench_distill.py --recipe cifar10 --teacher-steps 5000 --student-steps 2000 --batch 128 \
        --teacher-width 384 --teacher-blocks 6 --student-width 192 --student-blocks 6 --precision bf16 --out ...   # on a GPU

1. A teacher is pretrained with the SSL recipe (``quickstart`` on scikit-learn's digits, or ``cifar10``;
   the schedule compressed to the run) for --teacher-steps.
2. The same student architecture is trained for --student-steps, same batch, three ways: from scratch
   with the SSL recipe; distilled in paper mode (the teacher checkpoint's frozen EMA teacher with its
   heads); distilled in headless mode (the teacher's stock transformers export, CLS + patch features).
Every run reports the kNN monitor (weighted k=20 on normalised CLS of the exported backbone, the
recipe's monitor split) at initialisation and at the end, its wall time, and the final teacher entropy
(1.0 = the flat collapse of the DINO head). Same seed for every run: the students start from the same weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dinov2_hf.training.config import load_train_config
from dinov2_hf.training.trainer import Trainer

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"

# Per recipe: the flags' defaults, and whether each run's schedule is compressed to its own length
# (cifar10's is 19,500 steps) or is the recipe's own, stopped at --*-steps (the quickstart's 400 steps).
RECIPES = {
    "quickstart": {"compress": False, "teacher_steps": 240, "student_steps": 120, "batch": 64, "teacher_width": 96, "teacher_blocks": 4,
                   "student_width": 64, "student_blocks": 2},
    "cifar10": {"compress": True, "teacher_steps": 300, "student_steps": 150, "batch": 32, "teacher_width": 96, "teacher_blocks": 4,
                "student_width": 48, "student_blocks": 2, "prototypes": 512, "head_hidden": 256, "local_crops": 2,
                "data": str(CIFAR / "train-00000-of-00005.parquet"), "knn_source": str(CIFAR / "test-00000-of-00001.parquet"),
                "knn_train": 2000, "knn_test": 1000},
}


def overrides(args, width: int, blocks: int, steps: int, output: Path, extra: list[str] = ()) -> list[str]:
    """One run's overrides of ``args.recipe``: its size, length, batch and output, and any flag given."""
    result = [
        f"model.overrides.hidden_size={width}", f"model.overrides.num_hidden_layers={blocks}",
        f"model.overrides.num_attention_heads={max(1, width // 32)}",  # head dim 32 keeps tiny models sensible
        "model.drop_path_rate=0.0", f"train.batch_size_per_device={args.batch}", f"train.num_workers={args.workers}",
        f"train.mixed_precision={args.precision}", f"train.max_steps={steps}", f"train.save_every={steps}",
        "train.log_with=none", f"train.output_dir={output}", f"train.seed={args.seed}", f"monitor.every={steps}", "monitor.k=20",
    ]
    if RECIPES[args.recipe]["compress"]:
        result += ["schedule.epochs=10", f"schedule.epoch_length={max(1, steps // 10)}", "schedule.warmup_epochs=1",
                   "schedule.warmup_teacher_temp_epochs=3"]
    optional = {"data": "data.source", "knn_source": "monitor.source", "knn_train": "monitor.train_images",
                "knn_test": "monitor.test_images", "local_crops": "crops.local_crops_number"}
    result += [f"{key}={getattr(args, flag)}" for flag, key in optional.items() if getattr(args, flag) is not None]
    if args.data is not None:
        result.append("data.shuffle_buffer=1000")
    for flag, keys in {"prototypes": ("dino.head_n_prototypes", "ibot.head_n_prototypes"),
                       "head_hidden": ("dino.head_hidden_dim", "ibot.head_hidden_dim")}.items():
        if getattr(args, flag) is not None:
            result += [f"{key}={getattr(args, flag)}" for key in keys]
    return [*result, *extra]


def run(name: str, recipe: str, overrides: list[str]) -> dict:
    start = time.perf_counter()
    trainer = Trainer(load_train_config(recipe, overrides))
    trained = trainer.train()
    history = trained.history
    result = {"knn_init": trained.initial_knn, "knn_final": trained.final_knn, "steps": trained.steps,
              "wall_seconds": round(time.perf_counter() - start, 1),
              "teacher_entropy_final": history[-1].get("teacher_entropy") if history else None}
    print(f"{name}: {json.dumps(result)}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="quickstart")
    for flag in ("teacher-steps", "student-steps", "batch", "teacher-width", "teacher-blocks", "student-width", "student-blocks",
                 "prototypes", "head-hidden", "local-crops", "knn-train", "knn-test"):
        parser.add_argument(f"--{flag}", type=int, help="default: the recipe's (see RECIPES)")
    parser.add_argument("--data", help="training images (default: the recipe's)")
    parser.add_argument("--knn-source", help="labelled kNN monitor images (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="train.num_workers (data loader processes)")
    parser.add_argument("--precision", default="no", help="train.mixed_precision (bf16 on a GPU)")
    parser.add_argument("--workdir", default="runs/bench_distill")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    for key, value in RECIPES[args.recipe].items():
        if key != "compress" and getattr(args, key) is None:
            setattr(args, key, value)
    if args.data is not None and not args.data.startswith("sklearn:") and not Path(args.data).exists():
        raise SystemExit(f"--data {args.data} does not exist (CIFAR-10 parquet shards are expected in {CIFAR}).")

    work = Path(args.workdir)
    results = {"config": vars(args)}
    results["teacher"] = run("teacher", args.recipe, overrides(args, args.teacher_width, args.teacher_blocks, args.teacher_steps, work / "teacher"))
    checkpoint = work / "teacher" / "checkpoints" / f"checkpoint-{args.teacher_steps}"
    student = (args.student_width, args.student_blocks, args.student_steps)
    results["scratch"] = run("scratch", args.recipe, overrides(args, *student, work / "scratch"))
    results["distilled_heads"] = run("distilled_heads", args.recipe, overrides(
        args, *student, work / "heads", [f"distill.teacher={checkpoint}", "distill.mode=heads"]))
    results["distilled_features"] = run("distilled_features", args.recipe, overrides(
        args, *student, work / "features", [f"distill.teacher={work / 'teacher' / 'export' / 'transformers'}", "distill.mode=features"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
