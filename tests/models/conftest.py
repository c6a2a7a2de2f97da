"""Model tests run single-threaded: tiny tensors gain nothing from intra-op threads, and
on a busy 2-core machine OpenMP's thread barriers made them many times slower."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
