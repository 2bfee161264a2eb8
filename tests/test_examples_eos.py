"""The edge-of-stability example (--fast) and the ``curvature eos`` command glue."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from curvature.cli_eos import build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_example():
    path = os.path.join(ROOT, "examples", "edge_of_stability.py")
    spec = importlib.util.spec_from_file_location("edge_of_stability_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_fast_writes_three_plots_and_reproduces(tmp_path, capsys):
    _load_example().main(["--fast", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "median S/thresh" in out and "eigvalsh" in out
    for name in ("eos", "eos_quadratic", "eos_adam"):
        assert open(tmp_path / f"{name}.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        runs = json.load(open(tmp_path / f"{name}.json"))["runs"]
        for run in runs:
            assert run["onset"] is not None
            assert 0.85 <= run["median_ratio"] <= 1.25
            # the threshold written is the closed form for the method
            assert run["threshold"] == pytest.approx((38.0 if name == "eos_adam" else 2.0) / run["lr"])


def test_cli_main_quadratic(tmp_path, capsys):
    assert main(["--problem", "quadratic", "--fast", "--out", str(tmp_path), "--lrs", "1.2", "--steps", "60"]) == 0
    out = capsys.readouterr().out
    assert "[quadratic]" in out and "wrote" in out
    js = json.load(open(tmp_path / "eos_quadratic.json"))
    assert [r["lr"] for r in js["runs"]] == [1.2]
    assert 0.85 <= js["runs"][0]["median_ratio"] <= 1.25


def test_cli_rejects_bad_arguments():
    p = build_parser()
    with pytest.raises(SystemExit):
        p.parse_args(["--lrs", "0.1,-2"])
    with pytest.raises(SystemExit):
        p.parse_args(["--problem", "cifar"])
    args = p.parse_args(["--lrs", "0.25,0.4", "--problem", "both"])
    assert args.lrs == (0.25, 0.4) and args.problem == "both"
    assert args.init == "private" and p.parse_args(["--init", "authors"]).init == "authors"
    with pytest.raises(SystemExit):
        p.parse_args(["--init", "xavier"])
