"""Make an installed but unimportable torchvision look absent (used by conftest.py and the README test)."""

import sys


def hide_broken_torchvision() -> None:
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
