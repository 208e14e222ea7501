"""Shared fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's small-tensor training with one intra-op thread.

    On a 2-core machine shared with other work, one thread is several times faster than two
    for these small networks; the previous setting is restored afterwards.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
