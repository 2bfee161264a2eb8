"""EKFAC against curvlinops' EKFACLinearOperator, the dense eigenvalue correction, and dense solves.

Truth: ``dense_ggn`` (explicit Jacobians) for the exact eigenvalue correction
``diag(Q^T GGN_block Q)`` in K-FAC's eigenbasis; the dense MC Fisher of one datum with the
same sampled labels; curvlinops (independent implementation) to 1e-10 in float64;
``torch.linalg.solve`` for the damped inverse.
"""

import pytest
import torch

from curvature import EKFACBlock, EKFACOperator, FisherOperator, ekfac, kfac
from dense_truth import dense_ggn, rel_err
from models import make_case
from test_kfac_models import _seq_case

EXACT = 1e-10


def _blocks(K, M):
    """The diagonal blocks of the dense ``M`` in ``K``'s block layout."""
    out, start = [], 0
    for b in K.blocks:
        n = b.shape[0]
        out.append(M[start:start + n, start:start + n])
        start += n
    return out


@pytest.mark.parametrize("case", ["mlp", "cnn", "seq_expand", "seq_reduce"])
def test_equals_curvlinops_ekfac(case):
    from curvlinops import EKFACLinearOperator

    if case.startswith("seq"):  # Linear layers on [B, T, D], outputs pooled to [B, C] (curvlinops' EKFAC needs 2-d)
        model, loss_fn, X, y = _seq_case("ce", pool=True)
        approx = case.split("_")[1]
    else:
        model, loss_fn, (X, y) = make_case(case, n=7)
        approx = "expand"
    data = [(X[:3], y[:3]), (X[3:], y[3:])]
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    for kind, fisher in (("kflr", "type-2"), ("empirical", "empirical")):
        for sep in (False, True):
            E = ekfac(model, loss_fn, data, kind=kind, approx=approx, separate_bias=sep)
            C = EKFACLinearOperator(model, loss_fn, params, data, fisher_type=fisher, kfac_approx=approx,
                                    separate_weight_and_bias=sep, check_deterministic=False)
            assert rel_err(E.to_dense(), C @ torch.eye(n, dtype=torch.float64)) < EXACT, (kind, sep)


@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_diagonal_is_the_exact_eigenvalue_correction_and_beats_kfac(case):
    model, loss_fn, (X, y) = make_case(case, n=6)
    G = dense_ggn(model, loss_fn, X, y)
    E = ekfac(model, loss_fn, (X, y))
    K = kfac(model, loss_fn, (X, y))
    assert isinstance(E, EKFACOperator) and E.names == K.names and E.param_names == K.param_names
    for Eb, Kb, Gb in zip(E.blocks, K.blocks, _blocks(E, G)):
        # K-FAC's eigenbasis (columns in our flat order) and the dense correction diag(Q^T G Q)
        Q = _basis(Eb)
        assert rel_err(Q.T @ Q, torch.eye(Q.shape[0], dtype=torch.float64)) < EXACT
        correction = torch.diagonal(Q.T @ Gb @ Q)
        assert rel_err(Eb.scales.reshape(-1), correction) < EXACT
        # Frobenius-optimal diagonal in that basis: never worse than K-FAC's products, here strictly better
        e_err, k_err = float((Eb.to_dense() - Gb).norm()), float((Kb.to_dense() - Gb).norm())
        assert e_err < k_err
    print(f"\n{case}: ||EKFAC - GGN_blocks|| / ||KFAC - GGN_blocks|| = "
          f"{float((E.to_dense() - G * _mask(E)).norm() / (K.to_dense() - G * _mask(K)).norm()):.3f}")


def _basis(Eb):
    """``QA ⊗ QB`` with rows in our flat order (weight entries, then bias)."""
    Q = torch.kron(Eb.QA, Eb.QB)
    return Q[Eb._perm] if Eb._perm is not None else Q


def _mask(K):
    return torch.block_diag(*[torch.ones(b.shape, dtype=torch.float64) for b in K.blocks])


def test_one_datum_mc_ekfac_is_the_mc_fisher_correction():
    model, loss_fn, (X, y) = make_case("mlp", n=1)
    E = ekfac(model, loss_fn, (X, y), kind="mc", mc_samples=3, seed=11)
    F = FisherOperator(model, loss_fn, (X, y), kind="mc", mc_samples=3, seed=11).to_dense()
    for Eb, Fb in zip(E.blocks, _blocks(E, F)):
        Q = _basis(Eb)
        assert rel_err(Eb.scales.reshape(-1), torch.diagonal(Q.T @ Fb @ Q)) < EXACT


def test_damped_inverse_diagonal_trace_logdet_match_dense():
    model, loss_fn, (X, y) = make_case("cnn", n=5)
    E = ekfac(model, loss_fn, (X, y))
    D = E.to_dense()
    n = D.shape[0]
    I = torch.eye(n, dtype=torch.float64)
    assert rel_err(D, D.T) < EXACT
    g = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert rel_err(E @ g, D @ g) < EXACT
    lam = 1e-2
    Ed = E.damped(lam)
    assert isinstance(Ed, EKFACOperator)
    assert rel_err(Ed.to_dense(), D + lam * I) < EXACT
    assert rel_err(Ed.solve(g), torch.linalg.solve(D + lam * I, g)) < EXACT
    assert rel_err(Ed.inverse() @ g, torch.linalg.solve(D + lam * I, g)) < EXACT
    assert rel_err(Ed.diagonal(), torch.diagonal(D) + lam) < EXACT
    assert abs(float(Ed.trace()) - float(torch.trace(D + lam * I))) < EXACT * float(torch.trace(D))
    assert abs(float(Ed.logdet()) - float(torch.logdet(D + lam * I))) < EXACT * abs(float(torch.logdet(D + lam * I)))
    with pytest.raises(ValueError, match="no factored damping"):
        E.damped(lam, mode="factored")
    singular = EKFACBlock(torch.eye(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64),
                          torch.tensor([[1.0, 0.0], [2.0, 3.0]], dtype=torch.float64))
    with pytest.raises(ZeroDivisionError, match="singular.*damping"):
        singular.solve(torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="kfra"):
        ekfac(model, loss_fn, (X, y), kind="kfra")
