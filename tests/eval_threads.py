"""One compute thread for the eval tests: their problems are tiny, and on a shared 2-core machine
(CI runs two pytest workers) multi-threaded BLAS / OpenMP spin-waits make them 10-100x slower."""

import pytest
import torch
from threadpoolctl import threadpool_limits


@pytest.fixture(autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(previous)
