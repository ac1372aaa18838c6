"""``dinov2-hf curate``: build a curated, deduplicated, cluster-balanced image dataset."""

from __future__ import annotations

import argparse

from ..data.shutdown import arrow_threads_finish


def add_curate_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "curate",
        help="curate a dataset: embed, deduplicate, retrieve, cluster-balance, write parquet shards",
        description="LVD-142M-style curation of an uncurated pool (optionally around a curated seed set): "
        "embed every image, remove exact / near duplicates and copies of evaluation images, retrieve the "
        "nearest pool images of each curated image, balance with hierarchical k-means, and write parquet "
        "shards with a dataset card. Settings come from an optional YAML file plus section.key=value "
        "overrides, e.g. pool.source=images/ sample.target_size=100000 output.output_dir=curated. "
        "Every stage resumes when rerun.",
    )
    parser.add_argument("--config", help="YAML file of settings (default: only the overrides)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.set_defaults(func=run_curate)


@arrow_threads_finish()  # datasets' waits for Arrow threads: once, at exit
def run_curate(args: argparse.Namespace) -> dict:
    from ..curate.config import load_curate_config
    from ..curate.pipeline import run_curation

    config = load_curate_config(args.config, args.overrides)  # fails on unknown keys before any work
    result = run_curation(config)
    for stage, count in result.counts.items():
        print(f"{stage:>25}: {count}")
    print(f"wrote {len(result.shards)} shard(s) to {result.output_dir / 'data'}; card {result.card}; manifest {result.manifest}")
    return result.counts
