"""Suite-wide settings.

The tests use small models and dense matrices (n <= a few thousand), where torch's
intra-op thread pool costs more than it saves and oversubscribes a shared 2-core CI
machine (a 40 x 40 ``eigh`` was measured 100x slower with two busy threads).  The whole
suite therefore runs with one intra-op thread, restored at the end.
"""

import pytest
import torch
from _torchvision_guard import hide_broken_torchvision

hide_broken_torchvision()  # before any test imports transformers


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
