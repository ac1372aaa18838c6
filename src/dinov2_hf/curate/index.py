"""faiss indexes for cosine search on L2-normalised embeddings, shared by dedup and retrieval.

Exact inner product (``IndexFlatIP``) for small databases; an inverted file (``IVF,Flat``) for large
ones, where exact search would cost n^2 d: it scans only ``nprobe`` of ``nlist`` lists per query.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
from tqdm.auto import tqdm

from .config import IndexSettings


def build_index(database: np.ndarray, settings: IndexSettings | None = None, seed: int = 0,
                nprobe: int | None = None) -> faiss.Index:
    """An inner-product index holding ``database`` (rows L2-normalised, so scores are cosines).

    ``nprobe`` overrides ``settings.nprobe`` (lists visited per query) for IVF indexes.
    """
    settings = settings or IndexSettings()
    database = np.ascontiguousarray(database, dtype=np.float32)
    n, dim = database.shape
    kind = settings.kind
    if kind == "auto":
        kind = "ivf" if n >= settings.ivf_min_size else "flat"
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = settings.nlist or max(1, int(4 * math.sqrt(n)))
        nlist = max(1, min(nlist, n // 16 or 1))
        # Many lists: an HNSW graph finds a query's nearest lists without comparing it to all of them.
        quantizer = "_HNSW32" if nlist >= 16384 else ""
        index = faiss.index_factory(dim, f"IVF{nlist}{quantizer},Flat", faiss.METRIC_INNER_PRODUCT)
        # The lists only need to be placed roughly (queries probe several): 16 seeded points per
        # list and 10 iterations, instead of faiss's 39-256 points and 25 iterations.
        rng = np.random.default_rng(seed)
        sample = database if n <= 16 * nlist else database[np.sort(rng.choice(n, 16 * nlist, replace=False))]
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed, ivf.cp.niter, ivf.cp.min_points_per_centroid = seed, 10, 1
        index.train(sample)
        ivf.nprobe = min(settings.nprobe if nprobe is None else nprobe, nlist)
    for start in range(0, n, 1 << 18):
        index.add(database[start : start + (1 << 18)])
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int, batch_size: int = 16384, desc: str = "search") -> tuple[np.ndarray, np.ndarray]:
    """(similarities, ids) of the ``k`` nearest database rows per query, best first; id -1 pads."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = max(1, min(k, index.ntotal))
    similarities = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    with tqdm(total=len(queries), desc=desc, unit="query", dynamic_ncols=True) as bar:
        for start in range(0, len(queries), batch_size):
            end = min(start + batch_size, len(queries))
            similarities[start:end], ids[start:end] = index.search(queries[start:end], k)
            bar.update(end - start)
    return similarities, ids
