"""Blockwise SLQ (estimators.block_spectra) against dense per-block truth."""

import json
import math

import pytest
import torch
from torch import nn

import curvature
from estimators.block_report import blockwise_spectrum_report
from estimators.block_spectra import block_spectra, js_distance
from tests.dense_truth import dense_hessian, trainable
from tests.models import classification_data, layernorm_residual


def _problem():
    model = layernorm_residual()
    X, y = classification_data(12, (4,))
    return model, nn.CrossEntropyLoss(), (X, y)


def _dense_blocks(model, loss_fn, data, op):
    H = dense_hessian(model, loss_fn, *data)
    out, start = [], 0
    for s in op.sizes:
        out.append(H[start:start + s, start:start + s])
        start += s
    return out


def test_full_krylov_recovers_every_block_spectrum():
    model, loss_fn, data = _problem()
    op = curvature.block_diagonal(curvature.HessianOperator, model, loss_fn, data)
    res = block_spectra(op, num_probes=2, num_steps=100, seed=3)  # >= every block size: exact rules
    assert res.names == op.names and res.sizes == list(op.sizes)
    for H_b, dens in zip(_dense_blocks(model, loss_fn, data, op), res.densities):
        ev = torch.linalg.eigvalsh(H_b)
        assert abs(float(dens.nodes.max()) - float(ev[-1])) <= 1e-8 * float(ev.abs().max())
        assert abs(float(dens.nodes.min()) - float(ev[0])) <= 1e-8 * float(ev.abs().max())


def test_quadrature_matches_the_probes_moments():
    """Per block and probe: sum_k w_k theta_k^j = q^T H_b^j q for j < 2m (Gauss rule), q the block's probe."""
    model, loss_fn, data = _problem()
    op = curvature.block_diagonal(curvature.HessianOperator, model, loss_fn, data)
    m, p, seed = 4, 3, 11
    res = block_spectra(op, num_probes=p, num_steps=m, seed=seed)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(op.shape[0], p, generator=g, dtype=op.dtype)
    start = 0
    for H_b, dens, s in zip(_dense_blocks(model, loss_fn, data, op), res.densities, op.sizes):
        qb = q[start:start + s] / torch.linalg.vector_norm(q[start:start + s], dim=0)
        start += s
        steps = min(m, s)
        for j in range(2 * steps):
            exact = torch.einsum("ip,ij,jp->p", qb, torch.linalg.matrix_power(H_b, j), qb)
            rule = (dens.weights * dens.nodes**j).sum(1)
            scale = float(torch.linalg.matrix_norm(H_b, 2)) ** j
            assert torch.allclose(rule, exact, rtol=0, atol=1e-9 * max(scale, 1.0))
    assert res.num_matvecs == p * m  # one block-diagonal product of p columns per step


def test_lockstep_equals_separate_slq_per_block():
    """A block's density equals spectral_density-style Lanczos on that block alone with the same probe."""
    from estimators.lanczos import lanczos_batched

    model, loss_fn, data = _problem()
    op = curvature.block_diagonal(curvature.HessianOperator, model, loss_fn, data)
    res = block_spectra(op, num_probes=1, num_steps=6, seed=0)
    q = torch.randn(op.shape[0], 1, generator=torch.Generator().manual_seed(0), dtype=op.dtype)
    start = 0
    for blk, dens, s in zip(op.blocks, res.densities, op.sizes):
        qb = q[start:start + s] / torch.linalg.vector_norm(q[start:start + s])
        start += s
        alphas, betas, lengths, _ = lanczos_batched(blk, qb, min(6, s), reorthogonalize=True)
        L = int(lengths[0])
        T = torch.diag(alphas[0, :L]) + torch.diag(betas[0, :L - 1], 1) + torch.diag(betas[0, :L - 1], -1)
        theta = torch.linalg.eigvalsh(T.double())
        assert torch.allclose(dens.nodes[0, :L].double(), theta, atol=1e-9 * (1 + float(theta.abs().max())))


def test_js_distance_properties():
    p = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    q = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    assert js_distance(p, p) == pytest.approx(0.0, abs=1e-12)
    assert js_distance(p, q) == pytest.approx(math.sqrt(math.log(2.0)), rel=1e-12)


def test_report_writes_png_and_json(tmp_path):
    model, loss_fn, data = _problem()
    rep = blockwise_spectrum_report(model, loss_fn, data, num_probes=2, num_steps=5, out_dir=str(tmp_path),
                                    progress=False, description="tiny")
    summary = json.loads((tmp_path / "blocks.json").read_text())
    assert [b["name"] for b in summary["blocks"]] == rep.spectra.names
    assert (tmp_path / "blocks.png").stat().st_size > 10_000
    assert 0.0 <= rep.js_mean <= 0.833
    assert "block heterogeneity" in rep.summary()


def test_refuses_an_operator_without_blocks():
    model, loss_fn, data = _problem()
    with pytest.raises(TypeError, match="block-diagonal"):
        block_spectra(curvature.HessianOperator(model, loss_fn, data))
    op = curvature.block_diagonal(curvature.HessianOperator, model, loss_fn, data)
    with pytest.raises(ValueError, match="num_steps"):
        block_spectra(op, num_steps=0)
    assert sum(p.numel() for p in trainable(model)) == op.shape[0]
