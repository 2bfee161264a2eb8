"""Stochastic Lanczos quadrature: exact quadrature identities, moments, known spectra, plots."""

import math

import pytest
import torch

from curvature import DenseOperator
from estimators import hutchinson_trace, spectral_density
from estimators._probes import draw_probes, make_generator
from spectra import operator_with_spectrum


def _op(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    lam = torch.cat([torch.tensor([40.0, 25.0, -8.0], dtype=torch.float64),
                     torch.rand(n - 3, generator=g, dtype=torch.float64) * 2 - 0.5])
    return operator_with_spectrum(lam, seed)[0], lam


def test_quadrature_reproduces_quadratic_forms_of_the_same_probes():
    op, lam = _op()
    p, m = 6, 20
    d = spectral_density(op, p, m, seed=4, block_size=p)
    gen, _ = make_generator(4, None, op.device)
    Om = draw_probes(op, p, "gaussian", gen)  # the probes SLQ drew
    A = op.matrix
    nrm2 = (Om * Om).sum(0)
    for j in range(0, 5):  # Gauss rule with m nodes is exact up to degree 2m - 1
        quad = (d.weights * d.nodes**j).sum(1)
        exact = (Om * (torch.linalg.matrix_power(A, j) @ Om)).sum(0) / nrm2
        assert torch.allclose(quad, exact, rtol=1e-9, atol=1e-12 * float(lam.abs().max()) ** j)
    # hence the first moment times ||w||^2 equals Hutchinson's samples with these probes
    hutch = hutchinson_trace(op, p, probe="gaussian", seed=4, block_size=p)
    assert torch.allclose((d.weights * d.nodes).sum(1) * nrm2, hutch.samples, rtol=1e-9)
    assert d.num_matvecs == p * m and d.nodes.shape == d.weights.shape == (p, m)


def test_density_integrates_to_one_and_moments_match_traces_statistically():
    op, lam = _op(seed=1)
    d = spectral_density(op, 30, 30, seed=0)
    assert torch.allclose(d.weights.sum(1), torch.ones(30, dtype=torch.float64), atol=1e-12)
    for sigma in (None, 0.5):
        t, phi = d.evaluate(torch.linspace(-20, 60, 8001, dtype=torch.float64), sigma)
        assert abs(float(torch.trapezoid(phi, t)) - 1) < 1e-6
    mom, se = d.moments(2)
    n = lam.numel()
    assert float(mom[0]) == pytest.approx(1.0, abs=1e-12)
    assert abs(float(mom[1]) - float(lam.sum()) / n) <= 4 * float(se[1])
    assert abs(float(mom[2]) - float((lam**2).sum()) / n) <= 4 * float(se[2])
    assert abs(float(d.trace()) - float(lam.sum())) <= 4 * n * float(se[1])


def test_concentrates_on_a_known_discrete_spectrum():
    lam = torch.cat([torch.full((100,), -1.0), torch.full((200,), 2.0), torch.full((100,), 5.0)]).double()
    op, _ = operator_with_spectrum(lam, seed=2)
    d = spectral_density(op, 40, 10, seed=1)
    # three distinct eigenvalues: every Krylov space is invariant after 3 steps
    assert d.num_matvecs == 40 * 3
    mask = d.weights > 0
    assert torch.allclose(d.nodes[mask].unique(sorted=True)[[0, -1]], torch.tensor([-1.0, 5.0], dtype=torch.float64), atol=1e-10)
    for value, frac in ((-1.0, 0.25), (2.0, 0.5), (5.0, 0.25)):
        w = (d.weights * ((d.nodes - value).abs() < 1e-8)).sum(1)  # mass per probe
        assert abs(float(w.mean()) - frac) <= 4 * float(w.std()) / math.sqrt(40)
    t, phi = d.evaluate(torch.tensor([-1.0, 0.5, 2.0, 3.5, 5.0], dtype=torch.float64), sigma=0.05)
    assert float(phi[1]) < 1e-100 and float(phi[3]) < 1e-100 and float(phi[2]) > 3


def test_outliers_are_resolved_next_to_the_bulk():
    op, lam = _op(seed=3)
    d = spectral_density(op, 4, 40, seed=0)
    assert torch.allclose(d.nodes.max(1).values, torch.full((4,), 40.0, dtype=torch.float64), rtol=1e-10)
    assert torch.allclose(d.nodes.min(1).values, torch.full((4,), -8.0, dtype=torch.float64), rtol=1e-10)


def test_plot_and_save_png(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    op, _ = _op(100)
    d = spectral_density(op, 3, 15, seed=0)
    path = tmp_path / "density.png"
    d.save_plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = d.plot()
    assert ax.get_yscale() == "log"
    y = ax.get_lines()[0].get_ydata()
    assert y.max() > 1e-3 and y.min() >= 1e-7  # the floor keeps gaps visible on the log axis


def test_reproducible_and_bad_input():
    op, _ = _op(80)
    a = spectral_density(op, 2, 8, seed=3)
    b = spectral_density(op, 2, 8, seed=3)
    c = spectral_density(op, 2, 8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.nodes, b.nodes) and a.seed == 3 and c.seed is None
    assert not torch.equal(a.weights, c.weights)
    with pytest.raises(ValueError, match="num_probes"):
        spectral_density(op, 0)
    with pytest.raises(ValueError, match="num_steps"):
        spectral_density(op, 2, 0)
    with pytest.raises(ValueError, match="symmetric"):
        spectral_density(DenseOperator(torch.randn(5, 5, dtype=torch.float64), is_symmetric=False))
    with pytest.raises(ValueError, match="sigma"):
        a.evaluate(sigma=0.0)
