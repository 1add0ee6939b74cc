"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test with one torch thread: on a 2-core CI box, intra-op threads only add contention for the
    tiny models of the model tests (test_vla.py and test_heads.py use it for every test)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
