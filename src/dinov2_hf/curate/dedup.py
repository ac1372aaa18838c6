"""Stage 2: remove exact duplicates, near-duplicates (copies) and copies of evaluation images.

Exact duplicates share the hash of their encoded bytes. Near-duplicates follow the DINOv2 paper's
copy-detection step: pairs of images at or above a cosine threshold are edges of a graph, whose
connected components (scipy) keep one image each. The pairs come from a self-join: rows are put
into k-means lists (faiss) and each row is compared, with one matrix product per list, to the rows
of its ``nprobe`` nearest lists, as an IVF search would, but at BLAS speed (a faiss IVF search of
1M x 384 rows against themselves took 6 minutes on 2 cores, this join about 1). Small collections
use a single list: the exact all-pairs answer. At most ``k`` partners per row and list are kept,
so a huge cluster of copies cannot exhaust memory; its rows still end in one component.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm.auto import tqdm

from .config import DedupSettings, IndexSettings
from .index import build_index, search

EXACT_JOIN_MAX = 20_000  # below this many rows the exact all-pairs join is cheap enough


def hash_labels(hashes: np.ndarray) -> np.ndarray:
    """A group label per row such that rows share a label exactly when their hashes are equal."""
    if len(hashes) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.ascontiguousarray(hashes), axis=0, return_inverse=True)[1].reshape(-1)


def join_lists(n: int, index: IndexSettings) -> int:
    """Lists of the self-join: one (exact) for small collections, else ``index.nlist`` or ~4 sqrt(n)."""
    if index.kind == "flat" or (index.kind == "auto" and n < EXACT_JOIN_MAX):
        return 1
    return max(1, min(index.nlist or int(4 * math.sqrt(n)), n // 16))


def near_duplicate_pairs(
    vectors: np.ndarray, threshold: float, k: int = 32, index: IndexSettings | None = None, seed: int = 0,
    nprobe: int = 4, chunk: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j), i < j, with cosine(vectors[i], vectors[j]) >= threshold, and their similarities."""
    index = index or IndexSettings()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(vectors)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.float32)
    lists = join_lists(n, index)
    if lists == 1:
        probes = np.zeros((n, 1), dtype=np.int64)
    else:
        rng = np.random.default_rng(seed)
        sample = vectors[np.sort(rng.choice(n, min(n, 16 * lists), replace=False))]
        clustering = faiss.Kmeans(vectors.shape[1], lists, niter=10, seed=seed, spherical=True, min_points_per_centroid=1)
        clustering.train(sample)
        quantizer = faiss.IndexFlatIP(vectors.shape[1])
        quantizer.add(clustering.centroids)
        probes = search(quantizer, vectors, min(nprobe, lists), desc="dedup: lists")[1]
    primary = probes[:, 0]  # each row lives in its nearest list and visits its nprobe nearest ones
    members_order = np.argsort(primary, kind="stable")
    members_bounds = np.searchsorted(primary[members_order], np.arange(lists + 1))
    visits = probes.reshape(-1)
    visits_order = np.argsort(visits, kind="stable")
    visits_bounds = np.searchsorted(visits[visits_order], np.arange(lists + 1))
    width = probes.shape[1]
    found_rows, found_cols, found_sims = [], [], []
    for listed in tqdm(range(lists), desc="dedup: near duplicates", unit="list", dynamic_ncols=True, disable=lists == 1):
        members = members_order[members_bounds[listed] : members_bounds[listed + 1]]
        visitors = visits_order[visits_bounds[listed] : visits_bounds[listed + 1]] // width
        if len(members) == 0:
            continue
        database = vectors[members]
        for start in range(0, len(visitors), chunk):
            rows = visitors[start : start + chunk]
            similarities = vectors[rows] @ database.T
            similarities[rows[:, None] == members[None, :]] = -np.inf  # not a copy of itself
            hits = similarities >= threshold
            crowded = np.flatnonzero(hits.sum(1) > k)
            if len(crowded):  # keep the k most similar partners of rows inside a big cluster of copies
                cut = -np.partition(-similarities[crowded], k - 1, axis=1)[:, k - 1 : k]
                hits[crowded] &= similarities[crowded] >= cut
            r, c = np.nonzero(hits)
            found_rows.append(rows[r])
            found_cols.append(members[c])
            found_sims.append(similarities[r, c])
    if not found_rows:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.float32)
    a, b = np.concatenate(found_rows), np.concatenate(found_cols)
    pairs = np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)
    pairs, first = np.unique(pairs, axis=0, return_index=True)
    return pairs, np.concatenate(found_sims)[first]


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected-component label of each of ``n`` rows in the graph with edges ``pairs``."""
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def copies_of(vectors: np.ndarray, hashes: np.ndarray | None, reference_vectors: np.ndarray,
              reference_hashes: np.ndarray | None, threshold: float, index: IndexSettings | None = None,
              seed: int = 0, desc: str = "copies", nprobe: int | None = None) -> np.ndarray:
    """Mask of the rows that copy a reference image: the same bytes, or cosine >= ``threshold`` to the nearest one."""
    found = np.zeros(len(vectors), dtype=bool)
    if not len(vectors) or not len(reference_vectors):
        return found
    if hashes is not None and reference_hashes is not None and len(reference_hashes):
        both = hash_labels(np.concatenate([reference_hashes, hashes]))
        found |= np.isin(both[len(reference_hashes) :], both[: len(reference_hashes)])
    similarities, _ = search(build_index(reference_vectors, index, seed, nprobe), vectors, 1, desc=desc)
    return found | (similarities[:, 0] >= threshold)


@dataclass
class DedupResult:
    keep: np.ndarray  # boolean mask over the pool's embedded rows
    groups: np.ndarray  # duplicate group of each row: the row that was kept for it (itself when unique)
    exact: int  # removed as exact copies
    near: int  # removed as near-duplicates
    leaked: int  # removed as copies of evaluation images


def deduplicate(
    vectors: np.ndarray,
    hashes: np.ndarray,
    settings: DedupSettings,
    eval_vectors: np.ndarray | None = None,
    eval_hashes: np.ndarray | None = None,
    index: IndexSettings | None = None,
    seed: int = 0,
) -> DedupResult:
    """Which pool rows to keep: one per exact group, one per near-duplicate component (the first row:
    deterministic), none that copy an eval image (same bytes, or cosine >= ``settings.eval_threshold``)."""
    n = len(vectors)
    keep = np.ones(n, dtype=bool)
    groups = np.arange(n)
    exact = near = leaked = 0
    if settings.exact and n:
        labels = hash_labels(hashes)
        first = np.unique(labels, return_index=True)[1]
        groups = first[labels]
        keep = groups == np.arange(n)
        exact = int(n - keep.sum())
    if settings.near and keep.sum() > 1:
        survivors = np.flatnonzero(keep)
        pairs, _ = near_duplicate_pairs(vectors[survivors], settings.threshold, settings.k, index, seed, settings.nprobe)
        labels = components(len(survivors), pairs)
        first = np.unique(labels, return_index=True)[1]
        representative = np.arange(n)
        representative[survivors] = survivors[first[labels]]
        groups = representative[groups]  # exact copies follow the row that represented them
        keep = groups == np.arange(n)
        near = int(len(survivors) - keep.sum())
    if eval_vectors is not None and len(eval_vectors) and keep.any():
        survivors = np.flatnonzero(keep)
        leaks = copies_of(vectors[survivors], hashes[survivors], eval_vectors, eval_hashes, settings.eval_threshold,
                          index, seed, desc="dedup: eval sets", nprobe=settings.nprobe)
        keep[survivors[leaks]] = False
        leaked = int(leaks.sum())
    return DedupResult(keep=keep, groups=groups, exact=exact, near=near, leaked=leaked)
