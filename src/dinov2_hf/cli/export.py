"""``dinov2-hf export``: a dinov2_hf folder as a stock transformers checkpoint (``--to transformers``; a folder that
is already stock is re-saved exactly), or any backbone we load as ONNX checked against PyTorch with onnxruntime
(``--to onnx``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_export_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a backbone in stock transformers format or as ONNX",
        description="--to transformers: a dinov2_hf checkpoint folder as a stock transformers dinov2 / "
        "dinov2_with_registers checkpoint (no custom code needed to load it); a folder that is already stock is "
        "re-saved through our model, weights exact. --to onnx: any backbone we load "
        "(our folders, stock transformers folders, Meta .pth, Hub ids) as model.onnx with dynamic batch, height "
        "and width, checked against PyTorch with onnxruntime. Both write the source folder's image processor, or "
        "else the DINOv2 one.",
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


def run_export(args: argparse.Namespace) -> None:
    from ..modeling.save import check_output_dir

    check_output_dir(args.output)  # a file in the way fails now, not after the weights are loaded
    if args.target == "onnx":
        run_export_onnx(args)
        return
    from ..modeling.convert_transformers import STOCK_MODEL_TYPES
    from ..modeling.loading import load_backbone
    from ..modeling.processor import saved_image_processor
    from ..modeling.save import export_transformers

    source = Path(args.input)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(
            f"{source} has no config.json; pass a dinov2_hf (or stock transformers Dinov2) checkpoint folder."
        )
    model_type = json.loads((source / "config.json").read_text()).get("model_type")
    # Our folders load strictly; a stock transformers folder (e.g. a run's export/transformers) goes through
    # from_transformers, so the q/k/v split is undone and redone exactly (loaded as ours, all attention would
    # be random). Anything else is refused by load_backbone, naming its model_type.
    model, _ = load_backbone(source)
    processor = saved_image_processor(source)  # keep the model's own preprocessing (crop size)
    export_transformers(model, args.output, image_processor=processor)
    stock = f"already stock {model_type}, re-saved; " if model_type in STOCK_MODEL_TYPES else ""
    print(
        f"Exported {source} -> {args.output} ({stock}{model.config.num_register_tokens} registers, "
        "stock transformers format)"
    )


def run_export_onnx(args: argparse.Namespace) -> dict[str, float]:
    """``dinov2-hf export --to onnx``: validate everything cheap, load, export, check with onnxruntime."""
    from ..modeling.loading import check_backbone_source, load_backbone
    from ..modeling.onnx import (
        DEFAULT_CHECK_SIZES,
        check_onnx,
        export_onnx,
        parse_size,
        require_onnx_packages,
        validate_opset,
        validate_sizes,
    )
    from ..modeling.processor import saved_image_processor

    require_onnx_packages()
    validate_opset(args.opset)
    sizes = [parse_size(text) for text in args.check_sizes] if args.check_sizes else list(DEFAULT_CHECK_SIZES)
    source = Path(args.input)
    check_backbone_source(args.input)
    config_file = source / "config.json"
    if args.check and source.is_dir() and config_file.is_file():  # check sizes vs patch size before loading weights
        validate_sizes(sizes, json.loads(config_file.read_text()).get("patch_size", 14))
    model, description = load_backbone(args.input)
    config = model.config
    if args.check:
        validate_sizes(sizes, config.patch_size)  # Meta .pth files and Hub ids: known once loaded
    processor = saved_image_processor(source)  # keep the model's own preprocessing
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

