"""The reproduction report and the authors' instances it is built on.

* The instance builders against the authors' own RNG calls, replayed here in numpy /
  torch (bit-equal draws, the notebook's transpose and metric, the EoS code's init).
* ``examples/reproductions.py`` at fast settings into a tmp dir: every claim check
  passes, the numbers in the Markdown are the ones in the JSONs, the EoS band is the
  min / median / max of the recorded post-onset ratios, and ``--from-json`` rebuilds
  the same report.  (This test also covers the fast runs of the lazy-Newton and
  ScaledGD examples, so those are not run a second time elsewhere.)
* Published settings: one slow test runs the whole report at ``--setting paper``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from estimators.eos import chebyshev_data, tanh_regression_net
from solvers import low_rank_ground_truth
from solvers.problems import make_chebyshev_rosenbrock, make_logsumexp_authors, make_pnorm_equations

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_test_{name}", ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------- the authors' instances
def test_logsumexp_authors_replays_the_notebook_calls():
    """Rectangular on purpose (n = 30 variables, m = 45 pieces), so a missing transpose fails."""
    n, m, mu = 30, 45, 1.0
    prob = make_logsumexp_authors(n, m, mu=mu, seed=3124)
    np.random.seed(3124)  # the notebook's cell, verbatim in numpy
    A = np.random.rand(n, m) * 2 - 1
    b = np.random.rand(m) * 2 - 1
    design = A.T
    a0 = -b / mu
    pi = np.exp(a0 - a0.max()) / np.exp(a0 - a0.max()).sum()
    shifted = design - design.T.dot(pi)
    assert prob.A.shape == (m, n)
    np.testing.assert_allclose(prob.A.numpy(), shifted, rtol=0, atol=1e-15)
    assert np.array_equal(prob.b.numpy(), b)
    assert np.array_equal(prob.metric().numpy(), A.dot(A.T))  # unshifted draw, no ridge
    assert prob.f_star == pytest.approx(mu * (a0.max() + math.log(np.exp(a0 - a0.max()).sum())), rel=1e-15)
    assert float(prob.f(torch.zeros(n, dtype=torch.float64))) == pytest.approx(prob.f_star, rel=1e-14)
    g0 = prob.gradient(torch.zeros(n, dtype=torch.float64))  # the minimiser is at 0
    assert float(g0.abs().max()) < 1e-14
    assert torch.equal(prob.x0, torch.ones(n, dtype=torch.float64))


def test_pnorm_and_chebyshev_seed_3124_are_the_notebook_draws():
    np.random.seed(3124)
    A = np.random.rand(10, 20) * 2 - 1
    b = np.random.rand(10) * 2 - 1
    pn = make_pnorm_equations(10, 20, p=4, seed=3124)
    assert np.array_equal(pn.A.numpy(), A) and np.array_equal(pn.b.numpy(), b)  # bit-equal
    np.random.seed(3124)
    x0 = np.random.rand(50)
    assert np.array_equal(make_chebyshev_rosenbrock(50, p=4, seed=3124).x0.numpy(), x0)


def test_right_from_left_truth_is_the_scripts_v_equals_u():
    X, L, R, s = low_rank_ground_truth(40, 40, 4, kappa=10, right_from_left=True, seed=2)
    Xi, Li, Ri, _ = low_rank_ground_truth(40, 40, 4, kappa=10, seed=2)
    assert torch.equal(L, R) and torch.equal(L, Li)  # same left factor, V* = U*
    assert not torch.allclose(Ri, Li)
    torch.testing.assert_close(X, X.T, rtol=0, atol=1e-15)
    torch.testing.assert_close(torch.linalg.eigvalsh(X)[-4:].flip(0), torch.linspace(1, 0.1, 4, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="n1 == n2"):
        low_rank_ground_truth(5, 6, 2, right_from_left=True)


def test_eos_authors_init_replays_make_one_layer_network():
    state = torch.get_rng_state()
    net = tanh_regression_net(init="authors", seed=0)
    assert torch.equal(state, torch.get_rng_state())  # the global stream is restored
    with torch.random.fork_rng(devices=[]):  # the official code, verbatim (float32, global RNG)
        torch.manual_seed(0)
        ref = nn.Sequential(nn.Linear(1, 100, bias=True), nn.Tanh(), nn.Linear(100, 1, bias=False))
        nn.init.xavier_normal_(ref[0].weight, gain=1.9)
        nn.init.zeros_(ref[0].bias)
        nn.init.xavier_normal_(ref[2].weight)
    for p, q in zip(net.parameters(), ref.parameters()):
        assert p.dtype == torch.float64 and torch.equal(p, q.double())
    private = tanh_regression_net(seed=0)
    assert not torch.equal(private[0].weight, net[0].weight)
    X, y = chebyshev_data(float32_grid=True)
    x32 = torch.linspace(-1, 1, 20)
    assert torch.equal(X[:, 0], x32.double())
    assert torch.equal(y[:, 0], (4 * x32.double() ** 3 - 3 * x32.double()).float().double())
    with pytest.raises(ValueError, match="init"):
        tanh_regression_net(init="kaiming")


# ------------------------------------------------------------------- the report, fast
def test_report_fast_regenerates_and_every_claim_holds(tmp_path):
    repro = _load("reproductions")
    out, report = tmp_path / "figs", tmp_path / "REPRODUCTIONS.md"
    sections = repro.main(["--setting", "fast", "--out", str(out), "--report", str(report)])
    by = {s.title.split(" (")[0]: s for s in sections}
    assert len(sections) == 6
    for s in sections:
        if s.title.startswith("Sophia"):
            assert s.passed or (s.missing and "sophia.json" in s.missing)
            continue
        assert s.missing is None and s.checks, s.title
        assert s.passed, (s.title, [t for t, ok in s.checks if not ok])
    text = report.read_text()
    for png in ("logistic_lazy_newton.png", "scaled_gd_reproduction.png", "gns_logsumexp.png", "eos.png"):
        assert (out / png).stat().st_size > 10_000
        assert f"](figs/{png})" in text
    assert "does not exist yet" in text or "sophia.json" in text
    # the numbers in the Markdown are the JSONs' numbers
    sgd = json.loads((out / "scaled_gd.json").read_text())
    name, kappa, a, b, *_ = sgd["table"][0]
    assert f"| {name} | {kappa} | {a} |" in text
    gns = json.loads((out / "gns.json").read_text())
    assert gns["instances"] == "authors"
    k = gns["iterations_to_1e-8"]["logsumexp"]["GNS, exact Hessian"]
    assert f"| logsumexp | GNS, exact Hessian | {k} |" in text
    # the EoS band is min / median / max of the recorded ratios from the onset on
    eos = json.loads((out / "eos.json").read_text())
    assert eos["init"] == "authors" and eos["every"] % 2 == 1
    for run in eos["runs"]:
        ratios = torch.tensor([h["ratio"] for h in run["history"] if h["step"] >= run["onset"]], dtype=torch.float64)
        assert run["min_ratio"] == float(ratios.min()) and run["max_ratio"] == float(ratios.max())
        assert run["median_ratio"] == float(ratios.median())
        assert f"{run['min_ratio']:.3f} / {run['median_ratio']:.3f} / {run['max_ratio']:.3f}" in text
    assert "Lazy-Hessian Newton" in by and "Edge of stability" in by
    # the ScaledGD(lambda) stall study was run too, and its rows are in the report
    stall = json.loads((out / "scaled_gd_stall.json").read_text())
    row = stall["rows"][0]
    assert len(stall["rows"]) == len(stall["config"]["ms"]) * len(stall["config"]["lams"])
    assert f"| {row['m']} | {row['lam']:g} |" in text and "Why ScaledGD(λ) stalls" in text
    # --from-json rebuilds the same report without running anything
    again = tmp_path / "again.md"
    repro.main(["--from-json", "--out", str(out), "--report", str(again)])
    body = lambda t: [ln for ln in t.splitlines() if not ln.startswith("Generated by")]  # noqa: E731
    assert body(again.read_text()) == body(text)


def test_scaled_gd_stall_diagnostics_against_direct_computation():
    ex = _load("scaled_gd_reproduction")
    from solvers import matrix_sensing_problem

    P = matrix_sensing_problem(12, 2, 10, num_measurements=300, psd=True, seed=0)
    Y = torch.randn(12, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    d = ex.stall_diagnostics(P, Y, 2)
    torch.testing.assert_close(torch.tensor(d["gram_eigenvalues"], dtype=torch.float64),
                               torch.linalg.svdvals(Y).double() ** 2, rtol=1e-10, atol=1e-14)
    # the split of E = Y Y^T - M* over range(M*) and its complement is orthogonal: in^2 + 2 cross^2 + out^2 = total^2
    total = P.relative_error(Y @ Y.T)
    assert d["error_in"] ** 2 + 2 * d["error_cross"] ** 2 + d["error_out"] ** 2 == pytest.approx(total ** 2, rel=1e-10)
    assert d["sigma_min"] == pytest.approx(0.1, rel=1e-12)  # singular values linspace(1, 1/kappa)
    # the back-projection outside range(M*): its spectral norm, from an independent eigendecomposition
    U = torch.linalg.eigh(P.X_star)[1][:, -2:]
    basis = torch.linalg.qr(torch.cat([U, torch.eye(12, dtype=torch.float64)], 1))[0][:, 2:]  # complement of U
    S = P.adjoint(P.y)
    S = 0.5 * (S + S.T)
    outside = float(torch.linalg.eigvalsh(basis.T @ S @ basis).abs().max())
    assert d["backprojection_out_norm"] == pytest.approx(outside, rel=1e-10)


def test_scaled_gd_example_merges_panels_and_redraws(tmp_path):
    ex = _load("scaled_gd_reproduction")
    first = ex.main(["--fast", "--problems", "completion", "--out", str(tmp_path)])
    both = ex.main(["--fast", "--problems", "overparameterized", "--merge", "--out", str(tmp_path)])
    assert both["problems"] == ["completion", "overparameterized"]
    assert both["table"] == [list(row) for row in first["table"]]
    assert both["curves"]["completion"] == first["curves"]["completion"]
    assert len(both["overparameterized"]) == 2 and set(both["curves"]["overparameterized"]) == {"10", "100"}
    (tmp_path / "scaled_gd_reproduction.png").unlink()
    again = ex.main(["--fast", "--plot-only", "--out", str(tmp_path)])
    assert again == json.loads((tmp_path / "scaled_gd.json").read_text())
    assert (tmp_path / "scaled_gd_reproduction.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="cannot be merged"):
        ex.merge_results(dict(first, setting="paper"), first)


def test_sophia_section_reads_its_json_or_says_it_is_missing():
    repro = _load("reproductions")
    s = repro.section_sophia(None)
    assert s.missing and "sophia.json" in s.missing and not s.passed
    def record(adamw_steps, sophia_steps):
        return {"setting": {"n_layer": 3, "n_embd": 96, "steps": 300, "batch": 16, "block": 48, "seeds": 2},
                "target_val_loss": 0.65,
                "summary": {"adamw": {"lr": 6e-3, "final_val_loss_mean": 0.6, "final_val_loss_std": 0.01,
                                      "steps_to_target": adamw_steps},
                            "sophia": {"lr": 1.5e-3, "final_val_loss_mean": 0.7, "final_val_loss_std": 0.01,
                                       "steps_to_target": sophia_steps, "final_win_rate": 0.03}}}

    s = repro.section_sophia(record([300, 200], [None, 280]))  # Sophia misses the target on one seed
    assert s.missing is None and not s.passed and "3-layer" in s.setting
    assert "| sophia | 0.0015 | 0.700 +- 0.010 | not reached, 280 |" in s.lines
    assert repro.section_sophia(record([300, 200], [120, 130])).passed  # 125 <= 0.6 * 250: the claim holds
    assert not repro.section_sophia(record([300, 200], [200, 200])).passed


def test_report_rejects_unknown_sections(tmp_path):
    with pytest.raises(SystemExit, match="unknown section"):
        _load("reproductions").main(["--only", "newton", "--out", str(tmp_path), "--report", str(tmp_path / "r.md")])


# --------------------------------------------------------------- published settings
@pytest.mark.slow
def test_report_at_published_settings(tmp_path):
    """Sensing n = 200 (3.2 GB design), completion n = 1000, GNS notebook sizes, EoS every step (about an hour)."""
    sections = _load("reproductions").main(["--setting", "paper", "--out", str(tmp_path),
                                            "--report", str(tmp_path / "R.md")])
    for s in sections:
        if not s.title.startswith("Sophia"):
            assert s.passed, (s.title, [t for t, ok in s.checks if not ok])
