"""The solver examples run in --fast mode, write their PNGs and reproduce the expected ordering."""

import importlib.util
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "examples")


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_logistic_lazy_newton_fast(tmp_path, capsys):
    results = load("logistic_lazy_newton").main(["--fast", "--out", str(tmp_path)])
    assert os.path.getsize(tmp_path / "logistic_lazy_newton.png") > 10_000
    out = capsys.readouterr().out
    assert "lazy cubic Newton" in out and "Hess" in out
    full = results["cubic Newton (full)"]
    lazy = next(r for n, r in results.items() if n.startswith("lazy cubic"))
    assert full.success and lazy.success
    assert lazy.nhev * 3 <= full.nhev  # the point of lazy Hessians: far fewer Hessians
    gd = results["gradient descent"]
    assert gd.grad_norm > lazy.grad_norm  # GD has not reached gtol within its budget


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
