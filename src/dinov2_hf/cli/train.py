"""``dinov2-hf train`` and ``dinov2-hf distill``: a recipe plus ``section.key=value`` overrides, run by the Trainer.

Both commands run :func:`run_train`; ``distill --teacher T`` is ``train`` with ``distill.teacher=T``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path


def _add_recipe_arguments(parser, default: str, what: str) -> None:
    """``--config RECIPE_OR_YAML``, ``--print-config`` and ``section.key=value`` overrides; both train and distill
    run ``run_train``."""
    parser.add_argument("--config", default=default, help=f"recipe name or YAML file (default: {default}, {what})")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved recipe (overrides applied) as YAML and exit without building anything")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.set_defaults(func=run_train)


def add_train_parsers(subparsers) -> None:
    """Register ``train`` and ``distill``."""
    parser = subparsers.add_parser(
        "train",
        help="DINOv2 pretraining (also: accelerate launch train.py ...)",
        description="Train with a recipe shipped in the package (quickstart, cifar10, vits14_single_gpu, vitl16_short, "
        "vitl14, vitg14) or a YAML file, plus key=value overrides, e.g. data.source=images/ train.output_dir=runs/a.",
    )
    _add_recipe_arguments(parser, "quickstart", "on scikit-learn's digits")

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
    from ..training.config import load_train_config

    overrides = list(args.overrides) + ([f"distill.teacher={args.teacher}"] if getattr(args, "teacher", None) else [])
    config = load_train_config(args.config, overrides)  # fails on unknown keys before any work
    if getattr(args, "print_config", False):
        import yaml

        from ..config_utils import to_dict

        # Every key, defaults included: the output is itself a recipe (``--config printed.yaml``).
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return

    from ..hub.training import hub_callbacks
    from ..training.trainer import Trainer

    callbacks = hub_callbacks(config)  # checks the push target and token before any work
    _stop_with_launcher()
    trainer = Trainer(config, callbacks)
    if trainer.accelerator.is_main_process:
        print(f"dinov2_hf train: {trainer.describe()}; {config.total_steps} steps -> {trainer.output_dir}", flush=True)
    # The report comes before the Arrow threads' wait at exit (data.shutdown): a launcher stopping the run gives
    # it 5 s after the signal, and the line saying where the checkpoint is must come out.
    result = trainer.train()
    code = _report(trainer, result) if trainer.accelerator.is_main_process else _exit_code(result)
    if code:
        raise SystemExit(code)


def _exit_code(result) -> int:
    """128 + the signal that stopped the run, 3 for train.stop_on_collapse, else 0."""
    if result.stop_signal is not None:
        return 128 + result.stop_signal
    return 3 if result.stopped_on_collapse else 0


def _report(trainer, result) -> int:
    """Print what the run did (main process) and return the command's exit code."""
    from ..hub.training import push_callback

    config = trainer.config
    if result.already_complete:
        _print_complete_run(trainer, result)
    elif result.stop_signal is not None:
        print(f"stopped by signal {result.stop_signal} at step {result.steps}; checkpoint {trainer.run.latest()}; "
              "run the same command to resume", flush=True)
    elif result.stopped_on_collapse:
        print(f"stopped at step {result.steps}: the objective collapsed for train.stop_on_collapse="
              f"{config.train.stop_on_collapse} steps (see the warning above for the keys to change); checkpoint "
              f"{trainer.run.latest()}")
    elif result.steps < result.total_steps:
        print(f"stopped at train.stop_at_step={result.steps} of {result.total_steps} steps; checkpoint saved, "
              "rerun without train.stop_at_step to resume")
    elif result.last is not None:
        last = result.last
        print(
            f"step {last['step'] + 1}: loss {last['loss']:.4f}, skipped images {last['skipped_images']}; "
            f"exported to {result.export_dir}"
        )
        if result.final_knn is not None:
            baseline = f"{result.initial_knn:.1%} at initialisation -> " if result.initial_knn is not None else ""
            print(f"kNN top-1 (k={config.monitor.k}) on {config.monitor.source}: {baseline}{result.final_knn:.1%} exported")
        pusher = push_callback(trainer.callbacks)
        if pusher is not None and pusher.result is not None:
            print(f"pushed to {pusher.result.repo_url}: {pusher.result.pr_url or pusher.result.commit_url}")
        elif pusher is not None and pusher.error is not None:
            print(f"push to {config.hub.repo_id} failed: {pusher.error}; the export is kept. "
                  f"Retry with: dinov2-hf push {trainer.output_dir} {config.hub.repo_id}")
            return 1
    return _exit_code(result)


def _print_complete_run(trainer, result) -> None:
    """A rerun of a finished run: what it holds and where, and that nothing was done."""
    records = trainer.run.read_metrics()
    last = records[-1] if records else {}
    knn = [r for r in records if "knn_top1" in r]
    print(f"{result.output_dir} holds a complete run ({result.steps} of {result.total_steps} steps); nothing to do.")
    if last:
        print(f"step {last['step'] + 1}: loss {last['loss']:.4f}, skipped images {last.get('skipped_images', 0)}")
    if knn:
        print(f"kNN top-1 (k={trainer.config.monitor.k}) at step {knn[-1]['step'] + 1}: {knn[-1]['knn_top1']:.1%}")
    print(f"export: {result.export_dir}; per-step metrics: {trainer.run.metrics}. To train again, give another "
          "train.output_dir (or train.resume=none to start over in this one).")


def _stop_with_launcher() -> None:
    """Under ``accelerate launch`` (Linux): if the launcher dies without passing a signal on (it was killed, or an
    older Accelerate exits on SIGTERM without forwarding it), this process gets SIGTERM, and so checkpoints and
    stops, instead of training on, orphaned, with nothing to report to. Not for other parents: a run started with
    ``nohup`` from a shell must outlive the shell."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        command = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if not any(part.endswith(b"accelerate") for part in command) or b"launch" not in command:
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    except (OSError, AttributeError):
        return
    # The launcher relays our stderr: once it is gone, a write there raises BrokenPipeError, which would end the
    # run in the middle of its last step instead of at its checkpoint.
    sys.stdout, sys.stderr = _DropOnBrokenPipe(sys.stdout), _DropOnBrokenPipe(sys.stderr)
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


class _DropOnBrokenPipe:
    """A text stream that drops its writes once the reader at the other end of its pipe has gone."""

    def __init__(self, stream) -> None:
        self._stream, self._broken = stream, False

    def write(self, text: str) -> int:
        if not self._broken:
            try:
                return self._stream.write(text)
            except (BrokenPipeError, ValueError):  # (ValueError: the stream was closed)
                self._broken = True
        return len(text)

    def flush(self) -> None:
        if not self._broken:
            try:
                self._stream.flush()
            except (BrokenPipeError, ValueError):
                self._broken = True

    def __getattr__(self, name: str):
        return getattr(self._stream, name)
