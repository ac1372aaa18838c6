"""Continued pretraining (``model.init_from``): does adapting a pretrained backbone to a new domain help there?

1. The source: the ``quickstart`` recipe trained on scikit-learn's digits, its export re-saved in the stock
   transformers layout with the legacy on-disk key names that ``facebook/dinov2-*`` folders ship (a stand-in for a
   released model).
2. For each seed: ``adapt_cpu`` continues it on CIFAR-10 (fresh heads, trained alone for the first 10% of the run).
3. kNN (README "Small data" protocols: weighted k=20 on the exported backbone's L2-normalised CLS) on the new
   domain (CIFAR-10: 5,000 training images as memory, 1,000 test images as queries) and on the source domain
   (digits: 1,000 / 797), before and after; the teacher entropies over each run.

    python scripts/bench_adapt.py --seeds 0 1 2 --out benchmarks/bench_adapt_cpu.json

``--source-steps`` / ``--adapt-steps`` shorten the runs (``--dry-run``: a few steps, to check the script).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_recipes import CIFAR, RECIPES, export_knn  # noqa: E402

# The legacy on-disk names of the attention weights (transformers renames them when it loads such a folder).
LEGACY_NAMES = (("attention.q_proj", "attention.attention.query"), ("attention.k_proj", "attention.attention.key"),
                ("attention.v_proj", "attention.attention.value"), ("attention.o_proj", "attention.output.dense"))


def legacy_layout(export: Path, folder: Path) -> Path:
    """Re-save a stock transformers export with the legacy key names of the released ``facebook/dinov2-*`` files."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(export, folder, dirs_exist_ok=True)
    renamed = {}
    for key, value in load_file(export / "model.safetensors").items():
        for new, old in LEGACY_NAMES:
            key = key.replace(new, old)
        renamed[key] = value
    if not any("attention.attention.query" in key for key in renamed):
        raise RuntimeError(f"{export}: no attention weights to rename; is it a stock transformers Dinov2 export?")
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def train(recipe: str, overrides: list[str]) -> tuple[Path, list[dict], float]:
    """Run ``recipe`` to its end; its stock export, step records and wall time."""
    from dinov2_hf.training.config import load_train_config
    from dinov2_hf.training.trainer import Trainer

    started = time.perf_counter()
    config = load_train_config(recipe, [*overrides, "train.resume=none", "train.log_with=none", "monitor.every=0"])
    result = Trainer(config).train()
    return Path(result.export_dir) / "transformers", result.history, time.perf_counter() - started


def both_domains(export: Path) -> dict[str, float]:
    """kNN on CIFAR-10 (the new domain) and on the digits (the source domain)."""
    return {"cifar10": export_knn("cifar10_cpu", export, 32), "digits": export_knn("quickstart", export, 32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--source-steps", type=int, default=0, help="train.max_steps of the source run (default: the recipe's)")
    parser.add_argument("--adapt-steps", type=int, default=0, help="train.max_steps of each adaptation (default: the recipe's)")
    parser.add_argument("--source", help="a source backbone folder made by an earlier run (its source-legacy/): no source run")
    parser.add_argument("--set", nargs="*", default=[], help="overrides of each adaptation run (a lever to measure)")
    parser.add_argument("--dry-run", action="store_true", help="4 source and 4 adaptation steps: checks the script")
    parser.add_argument("--workdir", default="/tmp/bench_adapt")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.dry_run:
        args.source_steps, args.adapt_steps = 4, 4
    work = Path(args.workdir)
    source_overrides = [*RECIPES["quickstart"]["overrides"], f"train.output_dir={work / 'source'}", "train.seed=0"]
    if args.source_steps:
        source_overrides.append(f"train.max_steps={args.source_steps}")
    if args.source:
        source, source_seconds = Path(args.source), 0.0
    else:
        export, _, source_seconds = train("quickstart", source_overrides)
        source = legacy_layout(export, work / "source-legacy")
    record = {
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "torch": torch.__version__},
        "args": vars(args), "source": {"recipe": "quickstart", "data": "sklearn:digits", "wall_seconds": round(source_seconds, 1),
                                       "knn": both_domains(source)},
        "runs": [],
    }
    print(json.dumps({"source": record["source"]}), flush=True)
    for seed in args.seeds:
        overrides = [f"model.init_from={source}", f"data.source={CIFAR / 'train-*.parquet'}", f"train.seed={seed}",
                     f"train.output_dir={work / f'adapt-{seed}'}", *args.set]
        if args.adapt_steps:
            overrides.append(f"train.max_steps={args.adapt_steps}")
        adapted, history, seconds = train("adapt_cpu", overrides)
        run = {"seed": seed, "steps": len(history), "wall_seconds": round(seconds, 1), "knn": both_domains(adapted),
               "max_teacher_entropy": max(r["teacher_entropy"] for r in history),
               "min_batch_entropy": min(r["teacher_batch_entropy"] for r in history),
               "collapsed_steps": sum(int(r["collapse"]) for r in history),
               "entropy_curve": [{"step": r["step"], "teacher_entropy": round(r["teacher_entropy"], 4),
                                  "teacher_batch_entropy": round(r["teacher_batch_entropy"], 4)}
                                 for r in history if r["step"] % 10 == 0 or r is history[-1]]}
        record["runs"].append(run)
        print(json.dumps({k: v for k, v in run.items() if k != "entropy_curve"}), flush=True)
    after = [r["knn"]["cifar10"] for r in record["runs"]]
    record["summary"] = {
        "cifar10_source": record["source"]["knn"]["cifar10"], "cifar10_adapted_mean": statistics.mean(after),
        "cifar10_adapted_std": statistics.pstdev(after), "cifar10_gain": statistics.mean(after) - record["source"]["knn"]["cifar10"],
        "digits_source": record["source"]["knn"]["digits"],
        "digits_adapted_mean": statistics.mean(r["knn"]["digits"] for r in record["runs"]),
        "collapsed_steps": sum(r["collapsed_steps"] for r in record["runs"]),
    }
    print(json.dumps(record["summary"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
