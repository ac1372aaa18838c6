"""``dinov2-hf demo``: extract DINOv2 features from one image and print what the backbone returns."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_demo_parser(subparsers) -> None:
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


def run_demo(args: argparse.Namespace) -> dict:
    import torch

    from ..data import load_image
    from ..modeling import dinov2_image_processor
    from ..modeling.loading import load_backbone
    from ..modeling.processor import saved_image_processor

    image = load_image(args.image)
    model, description = load_backbone(args.model, args.preset)
    # The model's own preprocessing when it was saved with it (a 32 px export is fed 32 px crops), else 224 px.
    processor = saved_image_processor(args.model)
    if processor is None:
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
