"""Run the Sophia example (in-process, --fast) and check what it reports.

The ScaledGD example's fast run is covered by ``tests/test_reproductions.py`` (inside the
report generator, with the same checks on the iteration counts)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_sophia_char_lm_fast(tmp_path):
    ex = _load("sophia_char_lm")
    table = ex.main(["--fast", "--out", str(tmp_path)])
    assert (tmp_path / "sophia_char_lm.png").stat().st_size > 10_000
    _, _, V = ex.make_data(seed=0, train_sentences=50)
    for name in ("adamw", "sophia"):
        # both learn: well below the uniform-prediction loss log(V) after 60 steps
        assert table[name]["val"] < math.log(V) - 1.0, table
