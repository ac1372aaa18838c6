"""``dinov2-hf convert``: a Meta .pth or a transformers Dinov2 checkpoint into a dinov2_hf folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_convert_parser(subparsers) -> None:
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


def run_convert(args: argparse.Namespace) -> None:
    from ..modeling.convert_meta import from_meta
    from ..modeling.convert_transformers import from_transformers
    from ..modeling.save import check_output_dir, save_ours

    check_output_dir(args.output)  # a file in the way fails now, not after the weights are loaded
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
