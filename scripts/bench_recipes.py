"""Do the small-data recipes learn? Each recipe as shipped vs the same run with the official settings.

    python scripts/bench_recipes.py --out benchmarks/bench_recipes_cpu.json                 # quickstart + cifar10_cpu, ~25 min
    python scripts/bench_recipes.py --recipes quickstart --variants shipped --levers centering lr --out /tmp/levers.json
    python scripts/bench_recipes.py --recipes quickstart --variants shipped --set schedule.base_lr=0.004 --out /tmp/try.json

Every run is a complete run of the recipe (``train.max_steps`` fits the schedules to the run). The
kNN protocol (weighted k=20 on the L2-normalised CLS of the EMA teacher, which is the exported backbone):
- quickstart: scikit-learn's digits, the first 1,000 images as memory, the next 797 as queries;
- cifar10_cpu: the first 5,000 images of CIFAR-10's first training shard as memory, the first 1,000
  test images as queries.
The trainer's monitor measures the teacher at initialisation and at the end; the export is evaluated
again here from ``export/transformers`` with the eval package (``knn_export``). Raw pixels are the
baseline a representation should beat.

Variants:
- ``shipped``: the recipe as it ships;
- ``official``: the same model, data, crops, batch and steps with the official objective settings
  (softmax centering, center momentum 0.9, teacher temperature 0.04 -> 0.07, teacher momentum 0.992,
  LayerScale 1e-5, the 224-px blur, base lr 0.004, KoLeo 0.1, DINO objective);
- ``--levers``: the shipped recipe with one lever at a time put back to its official value, to
  measure what each lever is worth.
Collapse: the teacher entropy (1 = uniform targets: the flat collapse) and the batch entropy (0 = one
prototype for every image), relative to log K, over the logged steps after the lr warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

CIFAR = Path(os.environ.get("CIFAR_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"))

# Per recipe: the data flags a user passes, and the kNN protocol.
RECIPES = {
    "quickstart": {
        "overrides": ["monitor.train_images=1000", "monitor.test_images=797"],
        "memory": ("sklearn:digits", 1000), "queries": ("sklearn:digits", 797), "queries_after_memory": True,
    },
    "cifar10_cpu": {
        "overrides": [f"data.source={CIFAR / 'train-*.parquet'}",
                      f"monitor.source={CIFAR / 'train-00000-of-00005.parquet'}",
                      f"monitor.test_source={CIFAR / 'test-00000-of-00001.parquet'}",
                      "monitor.train_images=5000", "monitor.test_images=1000"],
        "memory": (str(CIFAR / "train-00000-of-00005.parquet"), 5000),
        "queries": (str(CIFAR / "test-00000-of-00001.parquet"), 1000), "queries_after_memory": False,
    },
}

# The official objective settings (dinov2/configs/ssl_default_config.yaml), grouped as levers: each lever
# is the set of keys one of our small-data changes touches.
OFFICIAL_LEVERS = {
    "centering": ["centering=softmax_center", "center_momentum=0.9"],
    "teacher_temp": ["schedule.teacher_temp=0.07", "schedule.warmup_teacher_temp=0.04", "schedule.warmup_teacher_temp_epochs=30",
                     "schedule.epochs=100"],
    "teacher_momentum": ["schedule.momentum_teacher=0.992"],
    "layerscale": ["model.layerscale_value=1e-5"],
    "blur": ["crops.blur=intended", "crops.blur_reference_size=0"],
    "lr": ["schedule.base_lr=0.004", "schedule.warmup_epochs=10", "schedule.epochs=100"],
}


CURVE_KEYS = ("step", "loss", "teacher_entropy", "teacher_batch_entropy", "cls_std", "alignment")


def official_overrides(levers: list[str]) -> list[str]:
    """The overrides putting ``levers`` back to the official values (epochs x epoch_length keeps the run length)."""
    result = [item for lever in levers for item in OFFICIAL_LEVERS[lever]]
    keys = {item.split("=")[0] for item in result}
    return [item for item in result if item.split("=")[0] != "schedule.epochs"] + (
        ["schedule.epochs=100"] if "schedule.epochs" in keys else []
    )


def raw_pixel_knn(recipe: str, size: int) -> dict[str, float]:
    """kNN on the raw pixels (resized to the global crop size): as they are, and with each image's mean subtracted."""
    from dinov2_hf.eval import knn_classify

    (memory, memory_labels), (queries, query_labels) = protocol_pixels(recipe, size)
    flat = {"plain": lambda x: x.flatten(1), "centered": lambda x: x.flatten(1) - x.flatten(1).mean(1, keepdim=True)}
    return {name: knn_classify(f(memory), memory_labels, f(queries), query_labels, ks=(20,))[20] for name, f in flat.items()}


def protocol_pixels(recipe: str, size: int):
    """(pixels, labels) of the memory and the queries, resized to ``size`` as the monitor does."""
    from PIL import Image

    from dinov2_hf.data.decode import open_rgb
    from dinov2_hf.data.sources import DataSettings, image_source, load_image_stream

    spec = RECIPES[recipe]

    def read(source: str, skip: int, count: int):
        stream = load_image_stream(DataSettings(source=source, label_column="label", shuffle_buffer=0))
        pixels, labels = [], []
        for index, example in enumerate(stream):
            if index < skip:
                continue
            if len(pixels) == count:
                break
            image = open_rgb(image_source(example["image"])).resize((size, size), Image.Resampling.BICUBIC)
            pixels.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255)
            labels.append(int(example["label"]))
        return torch.stack(pixels), torch.tensor(labels)

    (memory_source, n_memory), (query_source, n_queries) = spec["memory"], spec["queries"]
    memory = read(memory_source, 0, n_memory)
    queries = read(query_source, n_memory if spec["queries_after_memory"] else 0, n_queries)
    return memory, queries


@torch.no_grad()
def export_knn(recipe: str, export: Path, size: int) -> float:
    """kNN of the stock transformers export, loaded with the eval package, on the recipe's protocol."""
    from dinov2_hf.data.transforms import BatchedPhotometric
    from dinov2_hf.eval import knn_classify
    from dinov2_hf.modeling.loading import load_backbone

    model, _ = load_backbone(export)
    normalize = BatchedPhotometric().normalize
    (memory, memory_labels), (queries, query_labels) = protocol_pixels(recipe, size)
    features = lambda x: torch.cat([model(normalize(c.clone())).pooler_output for c in x.split(256)])  # noqa: E731
    return knn_classify(features(memory), memory_labels, features(queries), query_labels, ks=(20,))[20]


def run(recipe: str, variant: str, overrides: list[str], args, output: Path) -> dict:
    from dinov2_hf.training.config import load_train_config
    from dinov2_hf.training.trainer import Trainer

    # Every variant runs as many steps as the shipped recipe (or --steps): official lengths in epochs are fitted to it.
    steps = args.steps or load_train_config(recipe, [*RECIPES[recipe]["overrides"], *args.set]).total_steps
    every = args.log_every
    common = [*RECIPES[recipe]["overrides"], f"train.output_dir={output}", "train.resume=none", "train.log_with=none",
              f"train.seed={args.seed}", f"train.max_steps={steps}", *args.set]
    config = load_train_config(recipe, [*common, *overrides])
    config.monitor.every = config.total_steps  # kNN at initialisation and at the end (of the exported teacher)
    config.train.save_every = config.total_steps
    started = time.perf_counter()
    trainer = Trainer(config)
    result = trainer.train()
    history = result.history
    wall = time.perf_counter() - started
    warmup = trainer.phases[0].schedules.lr.warmup_iters
    after = [r for r in history if r["step"] >= warmup]
    logged = [r for r in history if r["step"] % every == 0 or r is history[-1]]
    size = config.crops.global_crops_size
    record = {
        "recipe": recipe, "variant": variant, "overrides": overrides, "steps": len(history), "wall_seconds": round(wall, 1),
        "knn_init": result.initial_knn, "knn_final": result.final_knn,
        "knn_export": export_knn(recipe, Path(output) / "export" / "transformers", size),
        # (objective=simdino has no prototypes: no entropies, its collapse indicator is cls_std)
        "max_teacher_entropy_after_warmup": max((r["teacher_entropy"] for r in after if "teacher_entropy" in r), default=None),
        "min_batch_entropy_after_warmup": min((r["teacher_batch_entropy"] for r in after if "teacher_batch_entropy" in r), default=None),
        "final_teacher_entropy": history[-1].get("teacher_entropy"), "final_batch_entropy": history[-1].get("teacher_batch_entropy"),
        "min_cls_std_after_warmup": min((r["cls_std"] for r in after), default=None),
        "collapsed_steps_after_warmup": sum(int(r["collapse"]) for r in after),
        "curve": [{k: round(r[k], 4) for k in CURVE_KEYS if k in r} for r in logged],
    }
    print(json.dumps({k: v for k, v in record.items() if k != "curve"}), flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--variants", nargs="+", default=["shipped", "official"], choices=["shipped", "official"])
    parser.add_argument("--levers", nargs="*", choices=list(OFFICIAL_LEVERS), default=None,
                        help="also run the shipped recipe with each lever (default: all) set back to its official value")
    parser.add_argument("--steps", type=int, default=0, help="train.max_steps for every run (default: the recipe's own length)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run")
    parser.add_argument("--log-every", type=int, default=20, help="steps between the points of each run's curve")
    parser.add_argument("--workdir", default="/tmp/bench_recipes")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    results = {"machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                           "torch": torch.__version__}, "args": vars(args), "runs": [], "raw_pixels": {}}
    for recipe in args.recipes:
        from dinov2_hf.training.config import load_train_config

        size = load_train_config(recipe, RECIPES[recipe]["overrides"]).crops.global_crops_size
        results["raw_pixels"][recipe] = raw_pixel_knn(recipe, size)
        runs = [(variant, official_overrides(list(OFFICIAL_LEVERS)) if variant == "official" else []) for variant in args.variants]
        if args.levers is not None:
            runs += [(f"shipped, official {lever}", official_overrides([lever])) for lever in args.levers or OFFICIAL_LEVERS]
        for variant, overrides in runs:
            output = Path(args.workdir) / recipe / variant.replace(", ", "-").replace(" ", "_")
            results["runs"].append(run(recipe, variant, overrides, args, output))
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1))  # after every run: a long benchmark keeps what it measured
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
