"""Stage 3: for each curated image, its k nearest pool images (cosine), as LVD-142M retrieves them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import IndexSettings
from .index import build_index, search


@dataclass
class Retrieval:
    similarities: np.ndarray  # (curated, k) cosine, best first
    neighbours: np.ndarray  # (curated, k) rows of the pool, -1 where fewer than k exist

    def selected(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Distinct retrieved pool rows, each with the curated image and similarity of its best match."""
        flat = self.neighbours.reshape(-1)
        queries = np.repeat(np.arange(len(self.neighbours)), self.neighbours.shape[1])
        sims = self.similarities.reshape(-1)
        valid = flat >= 0
        flat, queries, sims = flat[valid], queries[valid], sims[valid]
        order = np.lexsort((-sims, flat))  # by row, best similarity first
        rows, first = np.unique(flat[order], return_index=True)
        return rows, queries[order][first], sims[order][first]


def retrieve(pool: np.ndarray, curated: np.ndarray, k: int, index: IndexSettings | None = None, seed: int = 0) -> Retrieval:
    """The ``k`` nearest ``pool`` rows of every ``curated`` row (both L2-normalised)."""
    similarities, neighbours = search(build_index(pool, index, seed), curated, k, desc="retrieve")
    return Retrieval(similarities=similarities, neighbours=neighbours)
