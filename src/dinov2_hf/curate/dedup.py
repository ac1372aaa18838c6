"""Stage 2: remove exact duplicates, near-duplicates (copies) and copies of evaluation images.

Exact duplicates share the hash of their encoded bytes. Near-duplicates are found as in the DINOv2
paper's copy-detection step: the k nearest neighbours of every image (faiss), edges between pairs
at or above a cosine threshold, connected components of that graph (scipy), one image kept per
component. k bounds the search's work and memory, unlike a range search in a dense region.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .config import DedupSettings, IndexSettings
from .index import build_index, search


def hash_labels(hashes: np.ndarray) -> np.ndarray:
    """A group label per row such that rows share a label exactly when their hashes are equal."""
    if len(hashes) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.ascontiguousarray(hashes), axis=0, return_inverse=True)[1].reshape(-1)


def near_duplicate_pairs(
    vectors: np.ndarray, threshold: float, k: int = 32, index: IndexSettings | None = None, seed: int = 0,
    nprobe: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j), i < j, with cosine(vectors[i], vectors[j]) >= threshold among each row's k neighbours,
    and their similarities."""
    n = len(vectors)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.float32)
    similarities, ids = search(build_index(vectors, index, seed, nprobe), vectors, k + 1, desc="dedup: neighbours")
    rows = np.broadcast_to(np.arange(n)[:, None], ids.shape)
    mask = (similarities >= threshold) & (ids >= 0) & (ids != rows)
    pairs = np.stack([np.minimum(rows[mask], ids[mask]), np.maximum(rows[mask], ids[mask])], axis=1)
    pairs, first = np.unique(pairs, axis=0, return_index=True)
    return pairs, similarities[mask][first]


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
    """Which pool rows to keep: one per exact group, one per near-duplicate component, none that copy an eval image."""
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
