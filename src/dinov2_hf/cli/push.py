"""``dinov2-hf push`` and ``dinov2-hf push-dataset``."""

from __future__ import annotations

import argparse


def _add_target_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("repo_id", help="Hub repo id, e.g. my-user/dinov2-small-cifar (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", help="branch to commit to (created from main if missing)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to main")
    parser.add_argument("--commit-message", help="commit message (default: says what is uploaded)")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the `hf auth login` token)")


def add_push_parsers(subparsers) -> None:
    """Register ``push`` (a run's backbone) and ``push-dataset`` (a curated dataset)."""
    parser = subparsers.add_parser(
        "push",
        help="publish a run's backbone on the Hub with its model card",
        description="Upload a backbone with huggingface_hub (create_repo, upload_folder): stock transformers format at "
        "the repo root (no trust_remote_code), our format with the DINO/iBOT heads in dinov2_hf/, the image processor, "
        "a model card (recipe, compute, eval results as model-index, PCA feature image, usage code).",
    )
    parser.add_argument("source", help="a run's output_dir, its export/ folder, an export subfolder or a checkpoint-<step> folder")
    _add_target_arguments(parser)
    parser.add_argument("--format", dest="fmt", choices=["stock", "ours", "both"], default="both",
                        help="stock: stock transformers at the root; ours: our format with heads at the root; "
                        "both (default): stock at the root, ours with heads in dinov2_hf/")
    parser.add_argument("--eval-results", nargs="+", default=[], metavar="JSON",
                        help="`dinov2-hf eval --output` files for the card's results table and model-index")
    parser.add_argument("--dry-run", action="store_true", help="stage the upload and list it; no token or network needed")
    parser.add_argument("--stage-dir", help="stage into this (new) folder and keep it, e.g. to inspect the card")
    parser.set_defaults(func=run_push)

    dataset = subparsers.add_parser(
        "push-dataset",
        help="publish a `dinov2-hf curate` output on the Hub (datasets' push_to_hub + the curation card)",
        description="Upload a curated dataset: its card and manifest.csv, then the images with datasets' push_to_hub "
        "(parquet shards, Image feature with the original bytes), which adds dataset_info to the card.",
    )
    dataset.add_argument("source", help="the curate output folder (output.output_dir)")
    _add_target_arguments(dataset)
    dataset.add_argument("--dry-run", action="store_true", help="check and summarise; no token or network needed")
    dataset.set_defaults(func=run_push_dataset)


def run_push(args: argparse.Namespace) -> None:
    from ..hub.push import push_checkpoint

    result, _ = push_checkpoint(
        args.source, args.repo_id, private=args.private, revision=args.revision, create_pr=args.create_pr, fmt=args.fmt,
        token=args.token, commit_message=args.commit_message, eval_results=args.eval_results, dry_run=args.dry_run,
        staging_dir=args.stage_dir,
    )
    where = f"{result.repo_id} ({args.revision or 'main'}{', pull request' if args.create_pr else ''})"
    print(f"{'would upload' if args.dry_run else 'uploaded'} {len(result.files)} files from {args.source} to {where}, format {args.fmt}:")
    for name in result.files:
        print(f"  {name}")
    if args.stage_dir:
        print(f"staged in {args.stage_dir}")
    if not args.dry_run:
        print(f"repo: {result.repo_url}")
        print(f"commit: {result.commit_url}")
        if result.pr_url:
            print(f"pull request: {result.pr_url}")


def run_push_dataset(args: argparse.Namespace) -> None:
    from ..hub.push import push_dataset

    result, summary = push_dataset(args.source, args.repo_id, private=args.private, revision=args.revision,
                                   create_pr=args.create_pr, token=args.token, commit_message=args.commit_message,
                                   dry_run=args.dry_run)
    where = f"{result.repo_id} ({args.revision or 'main'}{', pull request' if args.create_pr else ''})"
    print(f"{'would upload' if args.dry_run else 'uploaded'} {args.source} to dataset {where}: {summary['images']:,} images "
          f"in {summary['shards']} shard(s), with {' and '.join(summary['files'])}")
    if not args.dry_run:
        print(f"repo: {result.repo_url}")
        print(f"commit: {result.commit_url}")
        if result.pr_url:
            print(f"pull request: {result.pr_url}")
