"""Chunked cosine search (kNN, retrieval, copy detection): every chunking gives the brute-force answer."""

import pytest
import torch
import torch.nn.functional as F
from eval_threads import single_thread  # noqa: F401  (autouse: one compute thread)

from dinov2_hf.eval.similarity import cosine_blocks, topk_cosine


def brute_force(queries: torch.Tensor, database: torch.Tensor) -> torch.Tensor:
    return F.normalize(queries, dim=1) @ F.normalize(database, dim=1).t()


@pytest.mark.parametrize("chunk_size", [50, 13, 1])  # queries: one chunk, uneven chunks, single rows
@pytest.mark.parametrize("database_chunk_size", [300, 97, 10, 7])  # one chunk, uneven, smaller than k, prime
def test_chunked_topk_equals_topk_of_the_full_similarity_matrix(chunk_size, database_chunk_size):
    generator = torch.Generator().manual_seed(0)
    queries, database = torch.randn(50, 24, generator=generator), torch.randn(300, 24, generator=generator) * 3
    similarity = brute_force(queries, database)
    for k in (1, 15, 300, 1000):  # k above a database chunk, the whole database, more than it (clipped)
        expected_sim, expected_idx = similarity.topk(min(k, 300), dim=1)
        sim, idx = topk_cosine(queries, database, k, database_chunk_size, chunk_size)
        assert sim.shape == idx.shape == (50, min(k, 300))
        torch.testing.assert_close(idx, expected_idx, rtol=0, atol=0)
        torch.testing.assert_close(sim, expected_sim, rtol=1e-5, atol=1e-6)
        assert (sim[:, 1:] <= sim[:, :-1]).all()  # sorted descending


@pytest.mark.parametrize("database_chunk_size", [40, 9, 4])
def test_full_ranking_keeps_exact_ties_in_index_order(database_chunk_size):
    # scaled one-hot rows, five of each: every cosine is one query entry, exact in any chunking, so ties are exact
    database = torch.eye(8)[torch.arange(40) % 8] * 2.0 ** torch.arange(40).remainder(3)[:, None]
    queries = torch.randint(0, 3, (6, 8), generator=torch.Generator().manual_seed(1)).float() + torch.eye(8)[:6]
    _, idx = topk_cosine(queries, database, len(database), database_chunk_size)
    expected = brute_force(queries, database).argsort(dim=1, descending=True, stable=True)
    torch.testing.assert_close(idx, expected, rtol=0, atol=0)


def test_blocks_tile_the_similarity_matrix():
    queries, database = torch.randn(11, 5), torch.randn(23, 5, dtype=torch.float64)  # any float dtype: searched in fp32
    tiled = torch.full((11, 23), float("nan"))
    for query_start, database_start, block in cosine_blocks(queries, database, chunk_size=4, database_chunk_size=6):
        assert block.dtype == torch.float32
        tiled[query_start : query_start + block.shape[0], database_start : database_start + block.shape[1]] = block
    torch.testing.assert_close(tiled, brute_force(queries, database.float()))


def test_empty_inputs():
    sim, idx = topk_cosine(torch.randn(3, 4), torch.zeros(0, 4), 5)
    assert sim.shape == idx.shape == (3, 0)
    sim, idx = topk_cosine(torch.zeros(0, 4), torch.randn(6, 4), 5)
    assert sim.shape == idx.shape == (0, 5)
