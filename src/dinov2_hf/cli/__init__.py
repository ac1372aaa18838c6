"""The ``dinov2-hf`` command line: ``demo``, ``train``, ``distill``, ``convert``, ``export``, ``eval``, ``curate``,
``push`` and ``push-dataset``.

One module per command, each registering its subparser(s) and holding the function that runs them:
``demo``, ``train`` (train and distill), ``convert``, ``export`` (transformers and onnx), ``eval``, ``curate``,
``push`` (push and push-dataset). Each subcommand validates its inputs (files exist, formats are known) before
loading any weights; the heavy imports stay inside the run functions, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys

from .convert import add_convert_parser
from .curate import add_curate_parser
from .demo import add_demo_parser
from .eval import add_eval_parser
from .export import add_export_parser
from .push import add_push_parsers
from .train import add_train_parsers


def package_version() -> str:
    """The installed distribution's version (``__version__`` when running from a source tree not installed)."""
    try:
        return importlib.metadata.version("dinov2-hf")
    except importlib.metadata.PackageNotFoundError:
        from .. import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinov2-hf", description="DINOv2 pretraining on the Hugging Face stack.")
    parser.add_argument("--version", action="version", version=f"dinov2-hf {package_version()}")
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
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse fills a nargs="*" positional from one run of values only, so overrides written after an option
        # (``distill a.b=c --teacher X d.e=f``) come back unrecognised; they are overrides all the same. Anything
        # that looks like an option (a misspelt flag) is still an error.
        if getattr(args, "overrides", None) is None or any(arg.startswith("-") for arg in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        args.func(args)
    except (FileNotFoundError, ValueError, RuntimeError, ImportError) as error:
        print(f"dinov2-hf {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0
