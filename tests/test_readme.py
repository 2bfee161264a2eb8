"""Every Python snippet in README.md runs as pasted (so the documentation cannot rot).

Blocks are executed in order, each in a fresh interpreter in one temporary directory
(a block may import a module an earlier block defines, as the README's ``mymod.py``).  A
block preceded by ``<!-- readme-test: skip ... -->`` is an excerpt of a user's script and
is not run.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- readme-test: skip[^>]*-->\n)?```python\n(.*?)```", re.S)


def _blocks():
    return [(m.group(2), m.group(1) is not None) for m in BLOCK.finditer(README.read_text())]


def test_readme_has_snippets():
    assert len(_blocks()) >= 10


def test_readme_snippets_run(tmp_path):
    for i, (code, skip) in enumerate(_blocks()):
        first = code.strip().splitlines()[0]
        if first.startswith("# ") and first.endswith(".py"):
            (tmp_path / first[2:]).write_text(code)  # a module the next blocks import
            continue
        if skip:
            continue
        script = tmp_path / f"snippet_{i}.py"
        # transformers imports torchvision when installed, and PyPI's CUDA-linked torchvision cannot be
        # imported beside a CPU torch (the README says so): hide it as tests/conftest.py does.
        prelude = (f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                   "from _torchvision_guard import hide_broken_torchvision\nhide_broken_torchvision()\n"
                   ) if "transformers" in code else ""
        script.write_text(prelude + code)
        proc = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
            timeout=300, env={**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1",
                              # this checkout's packages, not whichever copy is installed
                              "PYTHONPATH": os.pathsep.join([str(README.parent)] + (
                                  [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))},
        )
        if proc.returncode != 0:
            pytest.fail(f"README snippet {i} ({first!r}) failed:\n{proc.stderr[-3000:]}")

