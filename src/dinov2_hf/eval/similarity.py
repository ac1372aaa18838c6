"""Chunked cosine similarity search, shared by kNN classification, retrieval and copy detection.

Both sides are L2-normalised chunk by chunk (fp32, on the search device), so no normalised copy of a
large database is held: beyond the features, memory is one ``chunk_size x database_chunk_size``
similarity block. :func:`cosine_blocks` yields those blocks; :func:`topk_cosine` keeps a running
top-k over them (kNN, and retrieval's full ranking as ``k = len(database)``). Copy detection counts over
whole blocks instead, since its mAP needs the source's exact rank wherever it falls.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F


@torch.no_grad()
def cosine_blocks(
    queries: torch.Tensor,
    database: torch.Tensor,
    chunk_size: int = 1024,
    database_chunk_size: int = 65_536,
    device: str | torch.device | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(query_start, database_start, similarity)`` for every query chunk (outer) and database chunk (inner).

    ``similarity`` is the cosine of ``queries[query_start:][:chunk_size]`` against
    ``database[database_start:][:database_chunk_size]``, computed on ``device`` (default: the database's).
    """
    device = torch.device(device) if device is not None else database.device
    database_chunk_size = max(1, database_chunk_size)  # an empty database: one step over nothing
    for query_start in range(0, len(queries), chunk_size):
        rows = F.normalize(queries[query_start : query_start + chunk_size].to(device, torch.float32), dim=1)
        for database_start in range(0, len(database), database_chunk_size):
            chunk = database[database_start : database_start + database_chunk_size]
            yield query_start, database_start, rows @ F.normalize(chunk.to(device, torch.float32), dim=1).t()


def _best(similarity: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest per row, sorted; a full stable sort when ``k`` covers the row, so that exact ties keep the
    lower index first (``topk`` orders ties arbitrarily, and a full ranking should not)."""
    if k >= similarity.shape[1]:
        return similarity.sort(dim=1, descending=True, stable=True)
    return similarity.topk(k, dim=1)


@torch.no_grad()
def topk_cosine(
    queries: torch.Tensor,
    database: torch.Tensor,
    k: int,
    database_chunk_size: int = 65_536,
    chunk_size: int = 1024,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, indices), each ``(len(queries), min(k, len(database)))``, of the most cosine-similar database
    rows for each query row, sorted by decreasing similarity (on ``device``, default: the database's).

    Each database chunk's top-k is merged into a running top-k, so the result equals ``torch.topk`` over the whole
    similarity matrix (up to the order of exact ties when ``k`` is smaller than the database).
    """
    k = min(k, len(database))
    similarities: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []
    for _, start, block in cosine_blocks(queries, database, chunk_size, database_chunk_size, device):
        sim, idx = _best(block, k)
        idx += start
        if start:  # a later database chunk for the same queries: merge with their running top-k
            sim, order = _best(torch.cat([similarities[-1], sim], dim=1), k)
            similarities[-1], indices[-1] = sim, torch.cat([indices[-1], idx], dim=1).gather(1, order)
        else:
            similarities.append(sim)
            indices.append(idx)
    if not similarities:  # no queries, or an empty database
        device = torch.device(device) if device is not None else database.device
        return torch.zeros(len(queries), k, device=device), torch.zeros(len(queries), k, dtype=torch.long, device=device)
    return torch.cat(similarities), torch.cat(indices)
