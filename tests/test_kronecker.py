"""KroneckerOperator against torch.kron, and K-FAC against BackPACK and the exact GGN.

Truth: ``torch.kron`` / ``torch.linalg`` for the operator algebra; BackPACK run directly
for the factors; ``dense_ggn`` (explicit Jacobians, ``J^T Lambda J``) for the identities
K-FAC satisfies exactly (one example; Linear bias blocks; the last layer under MSE).
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import curvature
from curvature import GGNOperator, KroneckerOperator, kfac
from curvature.backpack import _seeded_batch
from dense_truth import dense_ggn, dense_jacobian, rel_err
from models import make_case

EXACT = 1e-10  # float64 products/solves of well-conditioned small matrices: ~1e-14 observed scale


def _spd(n, seed, shift=0.5):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    return M @ M.T / n + shift * torch.eye(n, dtype=torch.float64)


def _block_mask(K):
    return torch.block_diag(*[torch.ones(b.shape, dtype=torch.float64) for b in K.blocks])


# ------------------------------------------------------------------ operator algebra
def test_kronecker_product_matches_kron_and_row_major_vec_convention():
    A, B = _spd(3, 0), _spd(4, 1)
    K = KroneckerOperator(A, B)
    D = torch.kron(A, B)
    W = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # (A ⊗ B) vec(W) = vec(A W B^T) with vec = W.reshape(-1) (row-major)
    assert rel_err(K @ W.reshape(-1), (A @ W @ B.T).reshape(-1)) < EXACT
    assert rel_err(D @ W.reshape(-1), (A @ W @ B.T).reshape(-1)) < EXACT
    V = torch.randn(12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert rel_err(K @ V, D @ V) < EXACT
    assert rel_err(K.to_dense(), D) < EXACT and rel_err(curvature.LinearOperator.to_dense(K), D) < EXACT
    assert rel_err(K.diagonal(), D.diagonal()) < EXACT
    assert abs(float(K.trace()) - float(D.trace())) < EXACT * float(D.trace())
    assert abs(float(K.logdet()) - float(torch.logdet(D))) < EXACT * abs(float(torch.logdet(D))) + 1e-12
    assert K.is_symmetric and K.param_shapes == [torch.Size((3, 4))]


def test_nonsymmetric_factors_product_adjoint_and_solve():
    g = torch.Generator().manual_seed(4)
    A = torch.randn(3, 3, generator=g, dtype=torch.float64) + 3 * torch.eye(3, dtype=torch.float64)
    B = torch.randn(2, 2, generator=g, dtype=torch.float64) + 3 * torch.eye(2, dtype=torch.float64)
    K, D = KroneckerOperator(A, B), torch.kron(A, B)
    v = torch.randn(6, generator=g, dtype=torch.float64)
    assert not K.is_symmetric
    assert rel_err(K @ v, D @ v) < EXACT and rel_err(K.T @ v, D.T @ v) < EXACT
    assert rel_err(K.solve(v, method="exact"), torch.linalg.solve(D, v)) < EXACT


def test_bias_layout_permutes_kron_to_weight_then_bias_order():
    A, B = _spd(3, 5), _spd(5, 6)  # W [3, 4], b [3]; matrix [W | b] is [3, 5]
    K = KroneckerOperator(A, B, with_bias=True)
    W = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    b = torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    M = torch.cat([W, b[:, None]], 1)
    Y = A @ M @ B.T
    out = K @ [W, b]  # parameter format: weight then bias
    assert rel_err(out[0], Y[:, :4]) < EXACT and rel_err(out[1], Y[:, 4]) < EXACT
    D = K.to_dense()
    v = torch.cat([W.reshape(-1), b])
    assert rel_err(D @ v, torch.cat([Y[:, :4].reshape(-1), Y[:, 4]])) < EXACT
    assert rel_err(K.diagonal(), D.diagonal()) < EXACT
    assert rel_err(K.solve(v), torch.linalg.solve(D, v)) < EXACT


@pytest.mark.parametrize("with_bias", [False, True])
def test_solves_plain_exact_damping_and_factored_damping_match_dense(with_bias):
    A, B = _spd(4, 9, shift=0.0), _spd(3, 10, shift=0.0)  # rank-deficient-ish factors
    K = KroneckerOperator(A, B, with_bias=with_bias)
    D = K.to_dense()
    n = D.shape[0]
    g = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    I = torch.eye(n, dtype=torch.float64)
    lam = 0.3
    # plain solve: forward error of a backward-stable solve is O(n eps cond)
    eps = torch.finfo(torch.float64).eps
    assert rel_err(K.solve(g), torch.linalg.solve(D, g)) < 10 * n * eps * float(torch.linalg.cond(D))
    Kd = K.damped(lam)
    assert isinstance(Kd, KroneckerOperator)
    assert rel_err(Kd.to_dense(), D + lam * I) < EXACT
    assert rel_err(Kd.solve(g), torch.linalg.solve(D + lam * I, g)) < EXACT
    assert rel_err(Kd.inverse() @ g, torch.linalg.solve(D + lam * I, g)) < EXACT
    # factored: (A + sqrt(lam) I) ⊗ (B + sqrt(lam) I), and the pi-balanced variant
    r = lam ** 0.5
    Kf = KroneckerOperator(A + r * torch.eye(4, dtype=torch.float64), B + r * torch.eye(3, dtype=torch.float64),
                           with_bias=with_bias)
    assert rel_err(K.damped(lam, mode="factored").to_dense(), Kf.to_dense()) < EXACT
    pi = ((A.trace() / 4) / (B.trace() / 3)).sqrt()
    Kp = K.damped(lam, mode="factored_pi")
    assert rel_err(Kp.A, A + pi * r * torch.eye(4, dtype=torch.float64)) < EXACT
    assert rel_err(Kp.B, B + r / pi * torch.eye(3, dtype=torch.float64)) < EXACT
    assert rel_err(Kp.solve(g), torch.linalg.solve(Kp.to_dense(), g)) < EXACT


def test_singular_solve_and_bad_factors_raise():
    A = torch.zeros(2, 2, dtype=torch.float64)
    A[0, 0] = 1.0
    K = KroneckerOperator(A, torch.eye(2, dtype=torch.float64))
    with pytest.raises(ZeroDivisionError, match="singular.*damping"):
        K.solve(torch.ones(4, dtype=torch.float64))
    x = K.damped(1e-3).solve(torch.ones(4, dtype=torch.float64))  # fine once damped
    assert rel_err(x, torch.linalg.solve(K.to_dense() + 1e-3 * torch.eye(4, dtype=torch.float64),
                                         torch.ones(4, dtype=torch.float64))) < EXACT
    with pytest.raises(ValueError, match="square 2-d"):
        KroneckerOperator(torch.ones(2, 3), torch.eye(2))
    with pytest.raises(TypeError, match="share dtype"):
        KroneckerOperator(torch.eye(2), torch.eye(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="mode"):
        K.damped(0.1, mode="bogus")


# -------------------------------------------------------------------- K-FAC: exactness
@pytest.mark.parametrize("loss", ["mse_mean", "mse_sum", "ce_mean", "ce_sum"])
def test_single_linear_layer_one_example_kflr_equals_exact_ggn(loss):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    X = torch.randn(1, 4, dtype=torch.float64)
    kind, red = loss.split("_")
    if kind == "mse":
        loss_fn, y = nn.MSELoss(reduction=red), torch.randn(1, 3, dtype=torch.float64)
    else:
        loss_fn, y = nn.CrossEntropyLoss(reduction=red), torch.tensor([2])
    K = kfac(model, loss_fn, (X, y))
    assert K.names == ["0"] and K.param_names == [["0.weight", "0.bias"]]
    assert K.param_shapes == [p.shape for p in model.parameters()]
    assert rel_err(K.to_dense(), dense_ggn(model, loss_fn, X, y)) < EXACT
    # the layer's Jacobian in our flat order is [I ⊗ x^T, I]: the row-major vec of the weight
    J = dense_jacobian(model, X)
    assert rel_err(J, torch.cat([torch.kron(torch.eye(3, dtype=torch.float64), X), torch.eye(3).double()], 1)) < EXACT


def test_one_example_kflr_equals_layer_blocks_of_exact_ggn_mlp_and_conv_layout():
    model, loss_fn, (X, y) = make_case("mlp", n=1)
    K = kfac(model, loss_fn, (X, y))
    G = dense_ggn(model, loss_fn, X, y)
    assert rel_err(K.to_dense(), G * _block_mask(K)) < EXACT
    # Conv2d whose kernel covers the whole input (one output position): KFLR is exact too,
    # which checks the [out, c*kh*kw] layout of the weight against BackPACK's unfolding.
    torch.manual_seed(1)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Tanh(), nn.Linear(3, 2)).double()
    Xc, yc = torch.randn(1, 2, 3, 3, dtype=torch.float64), torch.tensor([1])
    lf = nn.CrossEntropyLoss()
    Kc = kfac(conv, lf, (Xc, yc))
    assert Kc.names == ["0", "3"] and Kc.blocks[0].with_bias  # a joint [W | b] block (KFC)
    assert rel_err(kfac(conv, lf, (Xc, yc), separate_bias=True).to_dense(),
                   dense_ggn(conv, lf, Xc, yc) * _block_mask(kfac(conv, lf, (Xc, yc), separate_bias=True))) < EXACT
    assert rel_err(Kc.to_dense(), dense_ggn(conv, lf, Xc, yc) * _block_mask(Kc)) < EXACT


def test_exact_blocks_for_any_batch_size_and_reported_approximation_error():
    # bias blocks of Linear layers are exact for any N: G = E[S S^T] = GGN_bb
    model, loss_fn, (X, y) = make_case("mlp", n=12)
    K = kfac(model, loss_fn, (X, y))
    G = dense_ggn(model, loss_fn, X, y)
    Kd = K.to_dense()
    sizes = [p.numel() for p in model.parameters()]
    offs = torch.tensor([0] + sizes).cumsum(0).tolist()
    for i in range(1, len(sizes), 2):  # bias entries of each layer
        s = slice(offs[i], offs[i + 1])
        assert rel_err(Kd[s, s], G[s, s]) < EXACT
    # under MSE, S_n S_n^T of the last layer is a constant multiple of I: its block is exact
    rmodel, rloss, (Xr, yr) = make_case("regression", n=12)
    Kr = kfac(rmodel, rloss, (Xr, yr))
    Gr = dense_ggn(rmodel, rloss, Xr, yr)
    last = Kr.shape[0] - Kr.sizes[-1]
    assert rel_err(Kr.to_dense()[last:, last:], Gr[last:, last:]) < EXACT
    # elsewhere K-FAC approximates: report (not assert) its error against the exact GGN blocks
    err = rel_err(Kd, G * _block_mask(K))
    print(f"\nK-FAC (KFLR) vs exact GGN layer blocks, MLP, N=12: relative Frobenius error {err:.3f}; "
          f"trace {float(K.trace()):.4f} vs {float(G.trace()):.4f}")
    assert 0 < err < 1  # a real approximation: neither exact nor garbage


# ------------------------------------------------------------- K-FAC vs BackPACK directly
def _backpack_factors(model, loss_fn, X, y, ext, attr, seed=None):
    import backpack

    work = backpack.extend(copy.deepcopy(model).eval())
    lf = backpack.extend(copy.deepcopy(loss_fn))
    if seed is not None:
        ctx = _seeded_batch(seed, 0, X.device)
    else:
        import contextlib
        ctx = contextlib.nullcontext()
    with ctx, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")  # inputs need no grad
        loss = lf(work(X), y)
        with backpack.backpack(ext):
            loss.backward()
    return {n: [f.detach() for f in getattr(p, attr)] for n, p in work.named_parameters()}


@pytest.mark.parametrize("kind", ["kflr", "kfra"])
def test_factors_equal_backpack_run_directly(kind):
    """KFLR on a Linear-only MLP and KFRA (BackPACK's path) on a CNN: BackPACK's own factors."""
    from backpack import extensions

    case = "mlp" if kind == "kflr" else "cnn"
    model, loss_fn, (X, y) = make_case(case, n=6)
    ext = {"kflr": extensions.KFLR(), "kfra": extensions.KFRA()}[kind]
    ref = _backpack_factors(model, loss_fn, X, y, ext, kind)
    K = kfac(model, loss_fn, (X, y), kind=kind, separate_bias=True)
    names = [n for n, _ in model.named_parameters()]
    assert K.names == names
    positions = {}  # output positions T of each Conv2d: its weight's input factor is BackPACK's / T
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: positions.__setitem__(name, o.shape[-2] * o.shape[-1]))
             for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(X)
    for h in hooks:
        h.remove()
    assert (case == "mlp") or (positions and all(t > 1 for t in positions.values()))
    for n, blk in zip(names, K.blocks):
        facs = ref[n]
        assert rel_err(blk.A, facs[0]) < EXACT
        if len(facs) == 2:
            scale = positions.get(n.rsplit(".", 1)[0], 1)
            assert rel_err(blk.B, facs[1] / scale) < EXACT
        else:
            assert blk.B.shape == (1, 1) and float(blk.B) == 1.0
    # joint Linear block: the same G, input factor augmented by the mean input and 1
    Kj = kfac(model, loss_fn, (X, y), kind=kind)
    lin = Kj.blocks[-1]
    last = names[-1].rsplit(".", 1)[0]
    assert Kj.names[-1] == last and lin.with_bias
    assert rel_err(lin.A, ref[f"{last}.weight"][0]) < EXACT
    assert rel_err(lin.B[:-1, :-1], ref[f"{last}.weight"][1]) < EXACT
    with torch.no_grad():
        xin = model[:int(last)].eval()(X)
    assert rel_err(lin.B[:-1, -1], xin.mean(0)) < EXACT and float(lin.B[-1, -1]) == 1.0


@pytest.mark.parametrize("red", ["mean", "sum"])
def test_batches_combine_to_kfac_of_concatenated_data(red):
    from backpack import extensions

    model, loss_fn, (X, y) = make_case("mlp", n=9, reduction=red)
    batches = [(X[:2], y[:2]), (X[2:], y[2:])]  # unequal sizes
    K = kfac(model, loss_fn, batches, separate_bias=True)
    ref = _backpack_factors(model, loss_fn, X, y, extensions.KFLR(), "kflr")
    for n, blk in zip(K.names, K.blocks):
        assert rel_err(blk.A, ref[n][0]) < EXACT
        if len(ref[n]) == 2:
            assert rel_err(blk.B, ref[n][1]) < EXACT
    Kj = kfac(model, loss_fn, batches)
    assert rel_err(Kj.to_dense(), kfac(model, loss_fn, (X, y)).to_dense()) < EXACT


def test_mc_kfac_is_seeded_and_leaves_model_rng_and_grads_alone():
    model, loss_fn, (X, y) = make_case("mlp", n=6)
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    K1 = kfac(model, loss_fn, (X, y), kind="kfac", seed=3)
    K2 = kfac(model, loss_fn, (X, y), kind="kfac", seed=3)
    K3 = kfac(model, loss_fn, (X, y), kind="kfac", seed=4)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(K1.to_dense(), K2.to_dense()) and not torch.equal(K1.to_dense(), K3.to_dense())
    assert model.training and all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None and not hasattr(p, "kfac") for p in model.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


# ------------------------------------------------------------------ use as a solver piece
def test_damped_kfac_solve_and_preconditioned_cg_on_ggn():
    model, loss_fn, (X, y) = make_case("mlp", n=10)
    K = kfac(model, loss_fn, (X, y))
    g = torch.randn(K.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lam = 1e-2
    Kd = K.damped(lam)
    eye = torch.eye(K.shape[0], dtype=torch.float64)
    assert isinstance(Kd, curvature.KFACOperator)
    assert rel_err(Kd.solve(g), torch.linalg.solve(K.to_dense() + lam * eye, g)) < EXACT
    assert rel_err(Kd.diagonal(), K.to_dense().diagonal() + lam) < EXACT
    # NewtonCG-style: CG on the damped GGN, preconditioned by the damped K-FAC inverse
    G = GGNOperator(model, loss_fn, (X, y)).damped(lam)
    x, info = G.solve(g, method="cg", tol=1e-10, preconditioner=Kd.inverse(), full_output=True)
    Gd = dense_ggn(model, loss_fn, X, y) + lam * eye
    cond = float(torch.linalg.cond(Gd))
    assert info.converged and rel_err(x, torch.linalg.solve(Gd, g)) < 1e-10 * cond
    # where K-FAC is exact (one Linear layer, MSE, any N) the preconditioned system is I: one iteration
    torch.manual_seed(2)
    lin = nn.Sequential(nn.Linear(6, 3)).double()
    Xl = torch.randn(20, 6, dtype=torch.float64) * torch.logspace(-2, 2, 6, dtype=torch.float64)
    yl, lf = torch.randn(20, 3, dtype=torch.float64), nn.MSELoss()
    Kl, Gl = kfac(lin, lf, (Xl, yl)), GGNOperator(lin, lf, (Xl, yl))
    bl = torch.randn(21, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _, plain = Gl.damped(lam).solve(bl, method="cg", tol=1e-8, full_output=True)
    _, pre = Gl.damped(lam).solve(bl, method="cg", tol=1e-8, preconditioner=Kl.damped(lam).inverse(),
                                  full_output=True)
    assert pre.num_iterations == 1 and plain.num_iterations > 1


def test_errors_name_the_problem():
    torch.manual_seed(0)
    ln = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    X, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"parameter '1.weight' belongs to module '1' \(LayerNorm\)"):
        kfac(ln, nn.CrossEntropyLoss(), (X, y))
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return torch.tanh(self.fc(x))

    with pytest.raises(ValueError, match="nn.Sequential"):
        kfac(Custom().double(), nn.CrossEntropyLoss(), (X, y), kind="kfra")
    with pytest.raises(ValueError, match="kind"):
        kfac(nn.Sequential(nn.Linear(3, 2)).double(), nn.CrossEntropyLoss(), (X, y), kind="ekfac")
    with pytest.raises(ValueError, match="approx"):
        kfac(nn.Sequential(nn.Linear(3, 2)).double(), nn.CrossEntropyLoss(), (X, y), approx="mean")
    with pytest.raises(NotImplementedError, match="L1Loss.*empirical"):
        kfac(nn.Sequential(nn.Linear(3, 2)).double(), nn.L1Loss(), (X, torch.zeros(4, 2).double()))
    # ignored targets are defined (each position weighted as in the loss), not refused: the bias block
    # of a Linear layer is exact for any batch, so it must equal the GGN's bias block
    lin = nn.Sequential(nn.Linear(3, 3)).double()
    ce = nn.CrossEntropyLoss(ignore_index=0)
    yi = torch.tensor([0, 1, 2, 0])
    K = kfac(lin, ce, (X, yi), separate_bias=True).to_dense()
    G_bias = curvature.GGNOperator(lin, ce, (X, yi), params=[lin[0].bias]).to_dense()
    assert torch.allclose(K[-3:, -3:], G_bias, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="reduction='none'"):
        kfac(nn.Sequential(nn.Linear(3, 2)).double(), nn.CrossEntropyLoss(reduction="none"), (X, y))
    with pytest.raises(ValueError, match="groups=2"):
        kfac(nn.Sequential(nn.Conv2d(2, 2, 1, groups=2)).double(), nn.MSELoss(), (X, y))


def test_symmetric_flag_checked_by_default_trusted_when_given_and_kept_by_damping():
    A, B = _spd(3, 0), _spd(4, 1)
    N = A.clone()
    N[0, 1] += 0.5
    assert KroneckerOperator(A, B).is_symmetric and not KroneckerOperator(N, B).is_symmetric
    E = A.clone()  # asymmetry at the rounding level of a matrix product: still symmetric
    E[0, 1] += 4 * torch.finfo(A.dtype).eps * float(A.abs().max())
    assert not torch.equal(E, E.T) and KroneckerOperator(E, B).is_symmetric
    K, Kn = KroneckerOperator(A, B, symmetric=True), KroneckerOperator(A, B, symmetric=False)
    assert K.is_symmetric and not Kn.is_symmetric  # the caller's flag, not checked
    for mode in ("exact", "factored", "factored_pi"):
        assert K.damped(0.1, mode=mode).is_symmetric and not Kn.damped(0.1, mode=mode).is_symmetric
    v = torch.randn(12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for op in (K, Kn):  # the flag changes the solver's route (eigenvalues / two solves), not the matrix
        assert rel_err(op @ v, torch.kron(A, B) @ v) < EXACT
        assert rel_err(op.solve(v), torch.linalg.solve(torch.kron(A, B), v)) < 1e-8


@pytest.mark.parametrize("kind", ["kflr", "kfac", "kfra"])
def test_kfac_factors_are_exactly_symmetric_in_float32(kind):
    """float32 Gram matrices from a matrix product are not exactly symmetric; the factors handed to
    KroneckerOperator(symmetric=True) are (symmetrized exactly)."""
    model, loss_fn, (X, y) = make_case("mlp", dtype=torch.float32, n=64)
    for separate_bias in (True, False):
        K = kfac(model, loss_fn, (X, y), kind=kind, separate_bias=separate_bias)
        for blk in K.blocks:
            assert blk.is_symmetric and torch.equal(blk.A, blk.A.T) and torch.equal(blk.B, blk.B.T)
