"""Suite-wide settings.

The tests use small models and dense matrices (n <= a few thousand), where torch's
intra-op thread pool costs more than it saves and oversubscribes a shared 2-core CI
machine (a 40 x 40 ``eigh`` was measured 100x slower with two busy threads).  The whole
suite therefore runs with one intra-op thread, restored at the end.
"""

import sys

import pytest
import torch


def _hide_broken_torchvision() -> None:
    """Make an installed but unimportable torchvision look absent.

    BackPACK's metadata pulls in PyPI's torchvision, whose Linux wheel is CUDA-linked and fails
    to import next to a CPU torch ("operator torchvision::nms does not exist").  Nothing here
    uses torchvision, but ``transformers`` imports it whenever it is installed and then fails
    as a whole.  Registering ``None`` in ``sys.modules`` is Python's documented way to make
    ``import torchvision`` raise ImportError (and ``importlib.util.find_spec`` return None), so
    libraries that treat it as optional skip it.  A working torchvision is left alone.
    """
    try:
        import torchvision  # noqa: F401
    except Exception:  # the broken CUDA wheel raises RuntimeError, not ImportError
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None


_hide_broken_torchvision()


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
