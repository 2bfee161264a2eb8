"""Run the Sophia example (in-process, --fast) and check what it reports (ScaledGD: tests/test_reproductions.py)."""

from __future__ import annotations

import importlib.util
import json
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
    res = ex.main(["--fast", "--out", str(tmp_path)])
    assert (tmp_path / "sophia.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "sophia.json").read_text())
    assert saved["summary"] == res["summary"] and saved["target_val_loss"] == res["target_val_loss"]
    _, _, V = ex.make_data(seed=0, train_sentences=50)
    for name in ("adamw", "sophia"):
        row = res["summary"][name]
        run = res["runs"][name][res["best"][name]][0]
        # both learn: well below the uniform-prediction loss log(V) after 60 steps
        assert row["final_val_loss_mean"] < math.log(V) - 0.8, row
        assert run["val_loss"][0] == pytest.approx(math.log(V), rel=0.1)  # starts near uniform
        # steps to target agree with the recorded curve
        reach = ex.steps_to_target(run["val_step"], run["val_loss"], res["target_val_loss"])
        assert row["steps_to_target"] == [reach]
        first = min(t for t, v in zip(run["val_step"], run["val_loss"]) if v <= res["target_val_loss"])
        assert reach == first
    # the recipe refreshed the curvature after iterations 10, 20, ..., 50 (not before the first step)
    assert res["runs"]["sophia"][res["best"]["sophia"]][0]["curvature_updates"] == 5
