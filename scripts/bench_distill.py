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

With a ready teacher (``--teacher FOLDER``, a backbone without heads such as the supervised CIFAR-10 teacher of
``scripts/make_distill_teacher.py``, a stand-in for a strong released model) nothing is pretrained: for each of
``--seeds`` the student is trained from scratch with the SSL recipe and distilled in headless mode from the same
initial weights, same steps and batch; the JSON holds per-seed kNN, the means and the margin (distilled - scratch).
Paper mode needs the teacher's DINO heads, which such a teacher has not: it is reported as not applicable.

    OMP_NUM_THREADS=1 python scripts/bench_distill.py --recipe cifar10_cpu --teacher tests/fixtures/cifar_teacher \
        --seeds 0 1 2 --student-width 64 --student-blocks 2 --student-steps 600 --batch 64 --workers 0 --threads 1 \
        --distill-set schedule.base_lr=0.032 distill.patch_weight=0 \
        --out benchmarks/bench_distill_supervised_teacher_cpu.json      # 6 runs, about 10 min each on one thread
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from dinov2_hf.modeling.loading import load_backbone  # noqa: E402
from dinov2_hf.training.config import MonitorSettings, load_train_config  # noqa: E402
from dinov2_hf.training.monitor import KnnMonitor  # noqa: E402
from dinov2_hf.training.trainer import Trainer  # noqa: E402

CIFAR = Path(os.environ.get("DINOV2_HF_CIFAR10", Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"))

# Per recipe: the flags' defaults, and whether each run's schedule is compressed to its own length
# (cifar10's is 19,500 steps) or is the recipe's own, stopped at --*-steps (the quickstart's 400 steps).
RECIPES = {
    "quickstart": {"compress": False, "teacher_steps": 240, "student_steps": 120, "batch": 64, "teacher_width": 96, "teacher_blocks": 4,
                   "student_width": 64, "student_blocks": 2},
    "cifar10": {"compress": True, "teacher_steps": 300, "student_steps": 150, "batch": 32, "teacher_width": 96, "teacher_blocks": 4,
                "student_width": 48, "student_blocks": 2, "prototypes": 512, "head_hidden": 256, "local_crops": 2,
                "data": str(CIFAR / "train-00000-of-00005.parquet"), "knn_source": str(CIFAR / "test-00000-of-00001.parquet"),
                "knn_train": 2000, "knn_test": 1000},
    # With --teacher (a ready, headless teacher): the cifar10_cpu student and the kNN protocol of README "Small data".
    "cifar10_cpu": {"compress": False, "student_steps": 150, "batch": 64, "student_width": 96, "student_blocks": 4,
                    "data": str(CIFAR / "train-*.parquet"), "knn_source": str(CIFAR / "train-00000-of-00005.parquet"),
                    "knn_test_source": str(CIFAR / "test-00000-of-00001.parquet"), "knn_train": 5000, "knn_test": 1000},
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
                "knn_test": "monitor.test_images", "knn_test_source": "monitor.test_source", "local_crops": "crops.local_crops_number"}
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


def teacher_knn(args) -> float:
    """kNN of the ready teacher itself, with the students' protocol (the monitor's settings and image size)."""
    config = load_train_config(args.recipe, overrides(args, args.student_width, args.student_blocks, 1, Path(args.workdir)))
    settings = MonitorSettings(**{**vars(config.monitor), "every": 1})
    teacher, _ = load_backbone(args.teacher)
    return KnnMonitor(settings, config.crops.global_crops_size)(teacher.float(), torch.device("cpu"))


def compare_with_ready_teacher(args) -> dict:
    """Per seed: the student from scratch (SSL recipe) and distilled headless from ``--teacher``, same initial weights."""
    work, student = Path(args.workdir), (args.student_width, args.student_blocks, args.student_steps)
    results = {"teacher": {"folder": args.teacher, "knn": teacher_knn(args)}, "per_seed": {},
               "distilled_heads": "not applicable: the teacher is a backbone without DINO heads (paper mode distils "
                                  "the teacher's prototype distributions)"}
    print(f"teacher: {json.dumps(results['teacher'])}", flush=True)
    for seed in args.seeds:
        args.seed = seed
        results["per_seed"][seed] = {
            "scratch": run(f"seed {seed} scratch", args.recipe, overrides(args, *student, work / f"seed{seed}" / "scratch")),
            "distilled_features": run(f"seed {seed} distilled_features", args.recipe, overrides(
                args, *student, work / f"seed{seed}" / "features", [f"distill.teacher={args.teacher}", "distill.mode=features", *args.distill_set])),
        }
    finals = {name: [runs[name]["knn_final"] for runs in results["per_seed"].values()] for name in ("scratch", "distilled_features")}
    margins = [d - s for s, d in zip(finals["scratch"], finals["distilled_features"])]
    results["summary"] = {
        "knn_scratch": finals["scratch"], "knn_distilled_features": finals["distilled_features"], "margins": margins,
        "mean_scratch": statistics.mean(finals["scratch"]), "mean_distilled_features": statistics.mean(finals["distilled_features"]),
        "mean_margin": statistics.mean(margins), "min_margin": min(margins),
    }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="quickstart")
    for flag in ("teacher-steps", "student-steps", "batch", "teacher-width", "teacher-blocks", "student-width", "student-blocks",
                 "prototypes", "head-hidden", "local-crops", "knn-train", "knn-test"):
        parser.add_argument(f"--{flag}", type=int, help="default: the recipe's (see RECIPES)")
    parser.add_argument("--data", help="training images (default: the recipe's)")
    parser.add_argument("--knn-source", help="labelled kNN monitor images (default: the recipe's)")
    parser.add_argument("--knn-test-source", help="kNN queries from this source (default: the recipe's; none: after the memory)")
    parser.add_argument("--teacher", help="a ready headless teacher (e.g. tests/fixtures/cifar_teacher): no pretraining; "
                                          "scratch vs headless distillation over --seeds")
    parser.add_argument("--distill-set", nargs="*", default=[], help="with --teacher: overrides of the distilled runs only "
                                                                      "(e.g. their own lr: schedule.base_lr=0.032)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="with --teacher: one comparison per seed")
    parser.add_argument("--workers", type=int, default=1, help="train.num_workers (data loader processes)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--precision", default="no", help="train.mixed_precision (bf16 on a GPU)")
    parser.add_argument("--workdir", default="runs/bench_distill")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    for key, value in RECIPES[args.recipe].items():
        if key != "compress" and getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data is not None and not args.data.startswith("sklearn:") and not glob.glob(args.data):
        raise SystemExit(f"--data {args.data} does not exist (CIFAR-10 parquet shards are expected in {CIFAR}).")
    if args.teacher:
        results = {"config": vars(args), **compare_with_ready_teacher(args)}
    else:
        if args.teacher_steps is None:
            raise SystemExit(f"--recipe {args.recipe} needs a ready --teacher (it pretrains none).")
        results = {"config": vars(args), **pretrain_and_compare(args)}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "config"}, indent=2))


def pretrain_and_compare(args) -> dict:
    """Issue 7's comparison: pretrain a teacher, then scratch vs paper mode vs headless mode (one seed)."""
    work = Path(args.workdir)
    results = {}
    results["teacher"] = run("teacher", args.recipe, overrides(args, args.teacher_width, args.teacher_blocks, args.teacher_steps, work / "teacher"))
    checkpoint = work / "teacher" / "checkpoints" / f"checkpoint-{args.teacher_steps}"
    student = (args.student_width, args.student_blocks, args.student_steps)
    results["scratch"] = run("scratch", args.recipe, overrides(args, *student, work / "scratch"))
    results["distilled_heads"] = run("distilled_heads", args.recipe, overrides(
        args, *student, work / "heads", [f"distill.teacher={checkpoint}", "distill.mode=heads"]))
    results["distilled_features"] = run("distilled_features", args.recipe, overrides(
        args, *student, work / "features", [f"distill.teacher={work / 'teacher' / 'export' / 'transformers'}", "distill.mode=features"]))
    return results


if __name__ == "__main__":
    main()
