"""The ``dinov2-hf`` command line: ``demo``, ``train``, ``distill``, ``convert``, ``export``, ``eval``, ``curate``,
``push`` and ``push-dataset``.

One module per command, each registering its subparser(s) and holding the function that runs them:
``demo``, ``train`` (train and distill), ``convert``, ``export`` (transformers and onnx), ``eval``, ``curate``,
``push`` (push and push-dataset). Each subcommand validates its inputs (files exist, formats are known) before
loading any weights; the heavy imports stay inside the run functions, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import sys

from .convert import add_convert_parser
from .curate import add_curate_parser
from .demo import add_demo_parser
from .eval import add_eval_parser
from .export import add_export_parser
from .push import add_push_parsers
from .train import add_train_parsers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinov2-hf", description="DINOv2 pretraining on the Hugging Face stack.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(subparsers)
    add_train_parsers(subparsers)
    add_convert_parser(subparsers)
    add_export_parser(subparsers)
    add_eval_parser(subparsers)
    add_curate_parser(subparsers)
    add_push_parsers(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError, RuntimeError, ImportError) as error:
        print(f"dinov2-hf {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0
