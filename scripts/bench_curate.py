"""Curation at scale on synthetic embeddings: dedup + 3-level hierarchical k-means + balanced sampling.

    python scripts/bench_curate.py --out benchmarks/bench_curate_cpu.json   # 1M x 384, 2 threads
    python scripts/bench_curate.py --n 100000                               # a quick check

The data: L2-normalised 384-d vectors around long-tailed (Zipf) concepts, plus planted copies:
``--near-copies`` of them are an existing vector plus small noise (cosine ~0.95), ``--exact-copies``
are byte-identical repeats (same hash). Stages run exactly as ``dinov2-hf curate`` runs them
(``deduplicate``, ``hierarchical_kmeans``, ``balanced_sample``); the embedding stage (model
inference) is not included. Reports wall time per stage, peak resident memory, the dedup
precision / recall against the planted copies, and how much flatter the sample is than the pool
over the top-level clusters (coefficient of variation of the cluster sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import faiss  # noqa: E402

from dinov2_hf.curate.config import DedupSettings, IndexSettings  # noqa: E402
from dinov2_hf.curate.dedup import deduplicate  # noqa: E402
from dinov2_hf.curate.kmeans import hierarchical_kmeans  # noqa: E402
from dinov2_hf.curate.sampling import balanced_sample  # noqa: E402


def synthetic(n: int, dim: int, concepts: int, near: int, exact: int, seed: int):
    """(vectors, hashes, origin): origin[i] is the row that row i copies (itself for originals)."""
    rng = np.random.default_rng(seed)
    base = n - near - exact
    weights = 1.0 / np.arange(1, concepts + 1) ** 1.1  # Zipf: a long tail of concepts
    labels = rng.choice(concepts, base, p=weights / weights.sum())
    centers = rng.standard_normal((concepts, dim), dtype=np.float32)
    vectors = np.empty((n, dim), dtype=np.float32)
    for start in range(0, base, 100_000):  # in chunks: no float64 temporaries of the whole array
        end = min(start + 100_000, base)
        chunk = centers[labels[start:end]] + 1.0 * rng.standard_normal((end - start, dim), dtype=np.float32)
        vectors[start:end] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    origin = np.arange(n)
    origin[base:] = rng.choice(base, near + exact, replace=False)
    copies = vectors[origin[base : base + near]] + 0.015 * rng.standard_normal((near, dim), dtype=np.float32)
    vectors[base : base + near] = copies / np.linalg.norm(copies, axis=1, keepdims=True)
    vectors[base + near :] = vectors[origin[base + near :]]
    hashes = np.zeros((n, 16), dtype=np.uint8)
    hashes[:, :8] = np.arange(n, dtype=np.uint64).view(np.uint8).reshape(n, 8)
    hashes[base + near :] = hashes[origin[base + near :]]  # exact copies: same bytes, same hash
    order = rng.permutation(n)  # copies do not follow their originals
    inverse = np.argsort(order)
    return vectors[order], hashes[order], inverse[origin[order]]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--concepts", type=int, default=5000)
    parser.add_argument("--near-copies", type=float, default=0.05, help="fraction of rows that are near copies")
    parser.add_argument("--exact-copies", type=float, default=0.01, help="fraction of rows that are exact copies")
    parser.add_argument("--levels", type=int, nargs=3, default=[2000, 200, 20])
    parser.add_argument("--resampling-steps", type=int, nargs=3, default=[1, 10, 10])
    parser.add_argument("--sample-sizes", type=int, nargs=3, default=[1, 5, 3])
    parser.add_argument("--max-points-per-centroid", type=int, default=64)
    parser.add_argument("--target", type=float, default=0.25, help="fraction of the pool to sample")
    parser.add_argument("--nlist", type=int, default=None, help="dedup self-join lists (default ~4 sqrt(n))")
    parser.add_argument("--nprobe", type=int, default=4, help="lists each row visits in the dedup self-join")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)

    near, exact = int(args.n * args.near_copies), int(args.n * args.exact_copies)
    start = time.perf_counter()
    vectors, hashes, origin = synthetic(args.n, args.dim, args.concepts, near, exact, args.seed)
    timings = {"generate_s": time.perf_counter() - start}

    start = time.perf_counter()
    index = IndexSettings(nlist=args.nlist)
    dedup = deduplicate(vectors, hashes, DedupSettings(nprobe=args.nprobe), index=index, seed=args.seed)
    timings["dedup_s"] = time.perf_counter() - start
    is_copy = origin != np.arange(args.n)
    planted = np.bincount(origin, minlength=args.n)[origin] >= 2  # rows in a planted group
    found = np.bincount(dedup.groups, minlength=args.n)[dedup.groups] >= 2
    precision = float((found & planted).sum() / max(found.sum(), 1))
    recall = float((found & planted).sum() / planted.sum())

    survivors = np.flatnonzero(dedup.keep)
    start = time.perf_counter()
    tree = hierarchical_kmeans(vectors[survivors], args.levels, args.resampling_steps, args.sample_sizes,
                               iterations=20, seed=args.seed, max_points_per_centroid=args.max_points_per_centroid)
    timings["hierarchical_kmeans_s"] = time.perf_counter() - start
    target = int(args.target * args.n)
    start = time.perf_counter()
    chosen = balanced_sample(tree, target, "random", seed=args.seed)
    timings["sampling_s"] = time.perf_counter() - start
    timings["total_curation_s"] = timings["dedup_s"] + timings["hierarchical_kmeans_s"] + timings["sampling_s"]

    top = np.bincount(tree.point_labels(3)[chosen], minlength=len(tree.centroids[2]))
    top_all = tree.sizes[2]
    result = {
        "n": args.n, "dim": args.dim, "concepts": args.concepts, "planted_near_copies": near, "planted_exact_copies": exact,
        "levels": args.levels, "resampling_steps": args.resampling_steps, "sample_sizes": args.sample_sizes,
        "max_points_per_centroid": args.max_points_per_centroid, "dedup_nprobe": args.nprobe, "threads": args.threads,
        **{k: round(v, 2) for k, v in timings.items()},
        "removed_exact": dedup.exact, "removed_near": dedup.near, "planted_copies_removable": int(is_copy.sum()),
        "dedup_precision": round(precision, 4), "dedup_recall": round(recall, 4),
        "clusters_per_level": [len(c) for c in tree.centroids], "sampled": int(len(chosen)),
        "top_level_cv_pool": round(float(top_all.std() / top_all.mean()), 3),
        "top_level_cv_sampled": round(float(top.std() / top.mean()), 3),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),  # other jobs sharing the cores
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads (faiss)",
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
