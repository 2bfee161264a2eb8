"""The GNS example (--fast, our instances) writes its PNGs and reproduces the expected ordering.

The lazy-Newton example's fast run (and the GNS example with ``--instances authors``) is
covered by ``tests/test_reproductions.py``, which runs it inside the report generator."""

import importlib.util
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "examples")


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gns_reproduction_fast(tmp_path, capsys):
    counts = load("gns_reproduction").main(["--fast", "--out", str(tmp_path)])
    for png in ("gns_logsumexp.png", "gns_pnorm4.png", "gns_rosenbrock.png", "gns_chebyshev.png"):
        assert os.path.getsize(tmp_path / png) > 10_000
    out = capsys.readouterr().out
    assert "LogSumExp" in out and "Sherman-Morrison" in out
    # second-order GNS needs far fewer iterations than the Euclidean gradient method
    lse = counts["logsumexp"]
    assert lse["GNS, exact Hessian"] < lse["gradient method, backtracking (Euclidean)"] / 10
    assert counts["rosenbrock"]["GNS, exact Hessian"] <= 60
    assert counts["pnorm4"]["GNS, Fisher term (Sherman-Morrison)"] <= counts["pnorm4"]["GNS, exact Hessian (Cholesky)"]


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
