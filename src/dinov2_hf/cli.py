"""The ``dinov2-hf`` command line: ``demo``, ``train``, ``distill``, ``convert``, ``export``, ``eval``, ``curate``,
``push`` and ``push-dataset``.

Each subcommand validates its inputs (files exist, formats are known) before loading any weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .curate.cli import add_curate_parser
from .eval.cli import add_eval_parser
from .hub.cli import add_push_parser


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="extract DINOv2 features from a real image (a built-in sample or your own file)",
        description="Feature-extraction demo: load a model (a checkpoint folder, or a randomly initialised "
        "preset), preprocess an image with the DINOv2 image processor and print what the backbone returns.",
    )
    parser.add_argument("--model", help="checkpoint folder (ours or stock transformers); default: random preset")
    parser.add_argument("--preset", default="vits14", help="architecture when --model is not given (default vits14)")
    parser.add_argument(
        "--image", default="china.jpg", help="image file, or a scikit-learn sample image: china.jpg or flower.jpg"
    )
    parser.add_argument("--json", dest="json_out", help="also write the summary as JSON to this file")
    parser.set_defaults(func=run_demo)


def _add_convert(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a Meta .pth or a transformers Dinov2 checkpoint into our format",
        description="Convert a checkpoint into a dinov2_hf folder (safetensors, config, code, image processor).",
    )
    parser.add_argument("--from", dest="source", required=True, choices=["meta", "transformers"])
    parser.add_argument("input", help="Meta .pth file, or transformers checkpoint folder")
    parser.add_argument("output", help="output folder")
    parser.add_argument("--head-dim", type=int, default=64, help="Meta only: attention head dimension (default 64)")
    parser.add_argument(
        "--interpolation",
        choices=["transformers", "antialias", "meta"],
        help="Meta only: position-embedding resize (default: what the released models use)",
    )
    parser.set_defaults(func=run_convert)


def _add_export(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a backbone in stock transformers format or as ONNX",
        description="--to transformers: a dinov2_hf checkpoint folder as a stock transformers dinov2 / "
        "dinov2_with_registers checkpoint (no custom code needed to load it). --to onnx: any backbone we load "
        "(our folders, stock transformers folders, Meta .pth, Hub ids) as model.onnx with dynamic batch, height "
        "and width, checked against PyTorch with onnxruntime. Both write the DINOv2 image processor.",
    )
    parser.add_argument("--to", dest="target", required=True, choices=["transformers", "onnx"])
    parser.add_argument("input", help="checkpoint folder (onnx: also a Meta .pth file or a Hub id)")
    parser.add_argument("output", help="output folder")
    onnx = parser.add_argument_group("onnx")
    onnx.add_argument("--opset", type=int, default=18, help="ONNX opset, 18 to 23 (default 18)")
    onnx.add_argument(
        "--check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compare onnxruntime with PyTorch on random images after the export (default: on)",
    )
    onnx.add_argument(
        "--check-size",
        dest="check_sizes",
        action="append",
        metavar="HxW",
        help="image size to check, repeatable (default: 224x224 and 154x322)",
    )
    onnx.add_argument("--atol", type=float, default=1e-4, help="largest accepted difference (default 1e-4)")
    onnx.add_argument(
        "--external-data",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="weights in model.onnx.data beside model.onnx (default: only past protobuf's 2 GB limit)",
    )
    parser.set_defaults(func=run_export)


def _add_recipe_arguments(parser, default: str, what: str) -> None:
    """``--config RECIPE_OR_YAML`` and ``section.key=value`` overrides; both train and distill run ``run_train``."""
    parser.add_argument("--config", default=default, help=f"recipe name or YAML file (default: {default}, {what})")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.set_defaults(func=run_train)


def _add_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="DINOv2 pretraining (also: accelerate launch train.py ...)",
        description="Train with a recipe shipped in the package (quickstart, cifar10, vits14_single_gpu, vitl16_short, "
        "vitl14, vitg14) or a YAML file, plus key=value overrides, e.g. data.source=images/ train.output_dir=runs/a.",
    )
    _add_recipe_arguments(parser, "quickstart", "on scikit-learn's digits")


def _add_distill(subparsers) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="distil a trained teacher into a smaller student (also: train.py with distill.teacher=...)",
        description="Distillation as in the DINOv2 paper: the frozen EMA teacher of one of our checkpoints (heads "
        "included) trains a student; or, from any backbone without heads (a stock transformers Dinov2 folder, a Meta "
        ".pth, a Hub id), the student regresses its CLS and patch features. The student's EMA is exported. "
        "Recipes: distill_cifar10, distill_quickstart, distill_vitg14_to_vit{s,b,l}14.",
    )
    parser.add_argument("--teacher", required=True, help="a checkpoint-<step> folder of a dinov2_hf run, or any backbone (headless mode)")
    _add_recipe_arguments(parser, "distill_cifar10", "the student's recipe")


def run_train(args: argparse.Namespace) -> None:
    from .hub.training import hub_callbacks, push_callback
    from .training.config import load_train_config
    from .training.trainer import Trainer

    overrides = list(args.overrides) + ([f"distill.teacher={args.teacher}"] if getattr(args, "teacher", None) else [])
    config = load_train_config(args.config, overrides)  # fails on unknown keys before any work
    callbacks = hub_callbacks(config)  # checks the push target and token before any work
    trainer = Trainer(config, callbacks)
    pusher = push_callback(callbacks)
    if trainer.accelerator.is_main_process:
        print(f"dinov2_hf train: {trainer.describe()}; {config.total_steps} steps -> {trainer.output_dir}", flush=True)
    try:
        result = trainer.train()
    finally:
        _let_arrow_threads_finish()
    if result.stop_signal is not None:
        print(f"stopped by signal {result.stop_signal} at step {result.steps}; checkpoint saved, rerun to resume")
        raise SystemExit(128 + result.stop_signal)
    if result.stopped_on_collapse:
        print(f"stopped at step {result.steps}: the objective collapsed for train.stop_on_collapse="
              f"{config.train.stop_on_collapse} steps (see the warning above for the keys to change); checkpoint saved")
        raise SystemExit(3)
    if result.steps < result.total_steps:
        print(f"stopped at train.stop_at_step={result.steps} of {result.total_steps} steps; checkpoint saved, "
              "rerun without train.stop_at_step to resume")
        return
    if trainer.accelerator.is_main_process and result.last is not None:
        last = result.last
        print(
            f"step {last['step'] + 1}: loss {last['loss']:.4f}, skipped images {last['skipped_images']}; "
            f"exported to {result.export_dir}"
        )
        if result.final_knn is not None:
            baseline = f"{result.initial_knn:.1%} at initialisation -> " if result.initial_knn is not None else ""
            print(f"kNN top-1 (k={config.monitor.k}) on {config.monitor.source}: {baseline}{result.final_knn:.1%} exported")
        if pusher is not None and pusher.result is not None:
            print(f"pushed to {pusher.result.repo_url}: {pusher.result.pr_url or pusher.result.commit_url}")
        elif pusher is not None and pusher.error is not None:
            print(f"push to {config.hub.repo_id} failed: {pusher.error}; the export is kept. "
                  f"Retry with: dinov2-hf push {trainer.output_dir} {config.hub.repo_id}")
            raise SystemExit(1)


def _let_arrow_threads_finish() -> None:
    """Streaming parquet leaves Arrow scanner threads behind when a pass stops early; if they are still
    alive at interpreter exit the process aborts ("terminate called without an active exception",
    huggingface/datasets#7566, apache/arrow#45214). Collect the dropped streams and give the threads
    the time `datasets` itself waits for them, once, before the process exits."""
    import gc

    from datasets import config as datasets_config

    gc.collect()
    time.sleep(datasets_config.SLEEP_TIME_ON_THREADS_SHUTDOWN)


def run_demo(args: argparse.Namespace) -> dict:
    import torch

    from .data import load_image
    from .modeling import dinov2_image_processor
    from .modeling.loading import load_backbone

    image = load_image(args.image)
    model, description = load_backbone(args.model, args.preset)
    processor = dinov2_image_processor()
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    start = time.perf_counter()
    with torch.inference_mode():
        output = model(pixel_values)
    seconds = time.perf_counter() - start
    config = model.config
    grid = pixel_values.shape[-1] // config.patch_size
    patches = output.last_hidden_state[:, 1 + config.num_register_tokens :]
    summary = {
        "model": description,
        "parameters_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "image": f"{args.image} {image.size[0]}x{image.size[1]}",
        "pixel_values": list(pixel_values.shape),
        "cls_embedding": list(output.pooler_output.shape),
        "patch_features": [1, grid, grid, patches.shape[-1]],
        "cls_norm": round(output.pooler_output.norm().item(), 4),
        "forward_seconds": round(seconds, 3),
    }
    for key, value in summary.items():
        print(f"{key:>20}: {value}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2))
    return summary


def run_convert(args: argparse.Namespace) -> None:
    from .modeling.convert_meta import from_meta
    from .modeling.convert_transformers import from_transformers
    from .modeling.save import save_ours

    source = Path(args.input)
    if args.source == "meta":
        if not source.is_file():
            raise FileNotFoundError(f"Meta checkpoint {source} is not a file.")
        model = from_meta(source, head_dim=args.head_dim, pos_embed_interpolation=args.interpolation)
    else:
        model = from_transformers(source)
    save_ours(model, args.output)
    config = model.config
    print(
        f"Converted {source} ({args.source}) -> {args.output}: hidden {config.hidden_size}, "
        f"{config.num_hidden_layers} blocks, {config.num_attention_heads} heads, "
        f"{'SwiGLU' if config.use_swiglu_ffn else 'MLP'} {config.intermediate_size}, "
        f"{config.num_register_tokens} registers, interpolation {config.pos_embed_interpolation}"
    )


def run_export(args: argparse.Namespace) -> None:
    if args.target == "onnx":
        run_export_onnx(args)
        return
    from . import Dinov2HFModel
    from .modeling.save import export_transformers

    source = Path(args.input)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} has no config.json; pass a dinov2_hf checkpoint folder.")
    model = Dinov2HFModel.from_pretrained(source)
    export_transformers(model, args.output)
    print(f"Exported {source} -> {args.output} ({model.config.num_register_tokens} registers, stock transformers format)")


def _check_backbone_source(source: Path) -> None:
    """Fail before loading unless ``source`` is a checkpoint folder with weights, a file, or a Hub id."""
    if source.is_dir():
        if not (source / "config.json").is_file():
            raise FileNotFoundError(f"{source} has no config.json; pass a checkpoint folder, a Meta .pth file or a Hub id.")
        if not any(source.glob("*.safetensors")) and not any(source.glob("*.bin")):
            raise FileNotFoundError(f"{source} has no weights (model.safetensors or pytorch_model.bin).")
    elif not source.exists() and str(source).count("/") != 1:
        raise FileNotFoundError(
            f"{source} does not exist: pass a checkpoint folder, a Meta .pth file or a Hub model id (owner/name)."
        )


def run_export_onnx(args: argparse.Namespace) -> dict[str, float]:
    """``dinov2-hf export --to onnx``: validate everything cheap, load, export, check with onnxruntime."""
    from .modeling.loading import load_backbone
    from .modeling.onnx import (
        DEFAULT_CHECK_SIZES,
        check_onnx,
        export_onnx,
        parse_size,
        require_onnx_packages,
        validate_opset,
        validate_sizes,
    )

    require_onnx_packages()
    validate_opset(args.opset)
    sizes = [parse_size(text) for text in args.check_sizes] if args.check_sizes else list(DEFAULT_CHECK_SIZES)
    source = Path(args.input)
    _check_backbone_source(source)
    config_file = source / "config.json"
    if args.check and source.is_dir() and config_file.is_file():  # check sizes vs patch size before loading weights
        validate_sizes(sizes, json.loads(config_file.read_text()).get("patch_size", 14))
    model, description = load_backbone(args.input)
    config = model.config
    if args.check:
        validate_sizes(sizes, config.patch_size)  # Meta .pth files and Hub ids: known once loaded
    processor = None
    if source.is_dir() and (source / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(source)  # keep the model's own preprocessing
    path = export_onnx(model, args.output, opset=args.opset, image_processor=processor, external_data=args.external_data)
    print(
        f"Exported {description} -> {path} (opset {args.opset}; batch, height and width dynamic; "
        f"{config.num_register_tokens} registers, interpolation {config.pos_embed_interpolation})"
    )
    if not args.check:
        return {}
    differences = check_onnx(path, model, sizes)
    print("onnxruntime vs PyTorch, max abs difference:")
    for key, value in differences.items():
        print(f"  {key}: {value:.1e}")
    worst = max(differences, key=differences.get)
    if differences[worst] > args.atol:
        raise RuntimeError(
            f"ONNX output {worst} differs from PyTorch by {differences[worst]:.2e} > --atol {args.atol:g}; "
            f"{path} is written but does not reproduce the model: please report this with the command."
        )
    return differences


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinov2-hf", description="DINOv2 pretraining on the Hugging Face stack.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_demo(subparsers)
    _add_train(subparsers)
    _add_distill(subparsers)
    _add_convert(subparsers)
    _add_export(subparsers)
    add_eval_parser(subparsers)
    add_curate_parser(subparsers)
    add_push_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError, RuntimeError, ImportError) as error:
        print(f"dinov2-hf {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
