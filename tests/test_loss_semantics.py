"""Loss semantics: every built-in loss weighted exactly across batches, closed forms only where exact.

Truth is independent of the code under test: PyTorch's own ``mean`` vs ``sum`` values for the
denominators, dense double-backward Hessians / Jacobians on the concatenated data, autograd
Hessians of the loss w.r.t. the output, and explicit per-example / per-token gradient
outer products (float64 throughout).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvature import (
    FisherOperator,
    GGNOperator,
    HessianOperator,
    MeanDenominatorError,
    TokenCrossEntropyLoss,
)
from curvature.losses import (
    LOSS_TABLE,
    ClosedFormOutputHessian,
    loss_spec,
    mean_denominator,
    output_hessian_sqrt,
    sample_output_gradients,
)
from dense_truth import dense_gradient, dense_hessian, dense_jacobian, flat, rel_err

EXACT = 1e-10
N, C, T = 7, 3, 4
SPLIT = 3  # batches X[:3], X[3:]: unequal sizes and unequal counts of ignored targets

pytestmark = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")


class _Transpose(nn.Module):
    """``[B, T, C] -> [B, C, T]``: class dim 1 for ``nn.CrossEntropyLoss`` on sequences."""

    def forward(self, x):
        return x.transpose(1, 2)


def _model(d_out=C, head=None, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, d_out)] + ([head] if head is not None else [])
    model = nn.Sequential(*layers).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _inputs(seq=False):
    return torch.randn((N, T, 3) if seq else (N, 3), generator=_g(1), dtype=torch.float64)


W = torch.tensor([0.5, 2.0, 1.3], dtype=torch.float64)
LABELS = torch.tensor([0, 2, 1, 1, 0, 2, 1])
IGNORED = torch.tensor([0, -100, 1, 1, -100, -100, 2])  # 1 of 3 ignored, then 2 of 4


def _soft_targets():
    """Probability rows that do not sum to one: a zero (padding) row, masses 0.5 and 1.7."""
    y = torch.softmax(torch.randn(N, C, generator=_g(2), dtype=torch.float64), 1)
    y[1] = 0.0
    y[3] *= 0.5
    y[5] *= 1.7
    return y


def _seq_targets():
    y = torch.randint(0, C, (N, T), generator=_g(3))
    y[0, 1] = y[2, 3] = y[4, 0] = y[4, 2] = y[5, 1] = y[6, 3] = y[6, 0] = -100  # 3 in batch 1, 4 in batch 2
    return y


def _pm1(shape):
    return (torch.randint(0, 2, shape, generator=_g(4)) * 2 - 1).double()


def _binary():
    return torch.randint(0, 2, (N, C), generator=_g(5)).double()


# name -> (model, loss_fn, X, y); covers every class of LOSS_TABLE with a denominator
CONFIGS = {
    "ce": lambda: (_model(), nn.CrossEntropyLoss(), _inputs(), LABELS),
    "ce_weight_ignore_smooth": lambda: (_model(), nn.CrossEntropyLoss(weight=W, label_smoothing=0.2), _inputs(),
                                        IGNORED),
    "ce_ignore_class": lambda: (_model(), nn.CrossEntropyLoss(ignore_index=1), _inputs(), LABELS),
    "ce_soft_targets": lambda: (_model(), nn.CrossEntropyLoss(weight=W, label_smoothing=0.1), _inputs(),
                                _soft_targets()),
    "ce_soft_plain": lambda: (_model(), nn.CrossEntropyLoss(), _inputs(), _soft_targets()),
    "ce_sequence_BCT": lambda: (nn.Sequential(_model(), _Transpose()), nn.CrossEntropyLoss(), _inputs(True),
                                _seq_targets()),
    "nll_weight_ignore": lambda: (_model(head=nn.LogSoftmax(1)), nn.NLLLoss(weight=W), _inputs(), IGNORED),
    "kl_batchmean": lambda: (_model(head=nn.LogSoftmax(1)), nn.KLDivLoss(reduction="batchmean"), _inputs(),
                             _soft_targets().clamp(min=1e-3)),
    "kl_mean_log_target": lambda: (_model(head=nn.LogSoftmax(1)), nn.KLDivLoss(reduction="mean", log_target=True),
                                   _inputs(), torch.log_softmax(torch.randn(N, C, generator=_g(6),
                                                                            dtype=torch.float64), 1)),
    "mse": lambda: (_model(), nn.MSELoss(), _inputs(), torch.randn(N, C, generator=_g(7), dtype=torch.float64)),
    "l1": lambda: (_model(), nn.L1Loss(), _inputs(), torch.randn(N, C, generator=_g(7), dtype=torch.float64)),
    "smooth_l1": lambda: (_model(), nn.SmoothL1Loss(beta=2.0), _inputs(),
                          torch.randn(N, C, generator=_g(7), dtype=torch.float64)),
    "huber": lambda: (_model(), nn.HuberLoss(delta=2.0), _inputs(),
                      torch.randn(N, C, generator=_g(7), dtype=torch.float64)),
    "bce_weight": lambda: (_model(head=nn.Sigmoid()), nn.BCELoss(weight=W), _inputs(),
                           torch.rand(N, C, generator=_g(8), dtype=torch.float64)),
    "bce_logits": lambda: (_model(), nn.BCEWithLogitsLoss(), _inputs(), _binary()),
    "bce_logits_weight_pos_weight": lambda: (_model(), nn.BCEWithLogitsLoss(weight=W, pos_weight=W.flip(0)),
                                             _inputs(), _binary()),
    "soft_margin": lambda: (_model(), nn.SoftMarginLoss(), _inputs(), _pm1((N, C))),
    "hinge_embedding": lambda: (_model(), nn.HingeEmbeddingLoss(margin=5.0), _inputs(), _pm1((N, C))),
    "poisson_nll": lambda: (_model(), nn.PoissonNLLLoss(full=True), _inputs(),
                            torch.randint(0, 4, (N, C), generator=_g(9)).double()),
    "multi_margin": lambda: (_model(), nn.MultiMarginLoss(p=2, margin=3.0, weight=W), _inputs(), LABELS),
    "multilabel_soft_margin": lambda: (_model(), nn.MultiLabelSoftMarginLoss(weight=W), _inputs(), _binary()),
    "multilabel_margin": lambda: (_model(), nn.MultiLabelMarginLoss(), _inputs(),
                                  torch.tensor([[0, -1, 0], [2, 1, -1], [1, -1, 0], [0, 2, -1], [2, -1, 1],
                                                [1, 0, -1], [0, -1, 2]])),
    "token_ce_shift_smooth": lambda: (_model(), TokenCrossEntropyLoss(shift=True, label_smoothing=0.1),
                                      _inputs(True), _seq_targets()),
    "token_ce": lambda: (_model(), TokenCrossEntropyLoss(), _inputs(True), _seq_targets()),
}


def _with_reduction(loss_fn, reduction):
    other = copy.deepcopy(loss_fn)
    other.reduction = reduction
    return other


def _true_denominator(loss_fn, z, y):
    """What PyTorch's mean divides by, from PyTorch itself: sum / mean."""
    return float(_with_reduction(loss_fn, "sum")(z, y) / loss_fn(z, y))


def _batches(X, y):
    return [(X[:SPLIT], y[:SPLIT]), (X[SPLIT:], y[SPLIT:])]


def _builtin_loss_classes():
    seen, todo = set(), [nn.modules.loss._Loss]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__ == "torch.nn.modules.loss" and sub not in seen:
                seen.add(sub)
                todo.append(sub)
    return {c for c in seen if not c.__name__.startswith("_")}


def test_every_builtin_loss_is_in_the_table_and_every_denominator_is_tested():
    missing = {c for c in _builtin_loss_classes() if not any(t in LOSS_TABLE for t in c.__mro__)}
    assert missing == set()  # NLLLoss2d keeps NLLLoss's forward: found through its base class
    covered = {type(CONFIGS[name]()[1]) for name in CONFIGS}
    with_denominator = {c for c, s in LOSS_TABLE.items() if s.denominator is not None}
    untested = with_denominator - covered - {getattr(nn, "LinearCrossEntropyLoss", None)}
    assert untested == set()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mean_denominator_is_what_pytorch_divides_by(name):
    model, loss_fn, X, y = CONFIGS[name]()
    with torch.no_grad():
        z = model(X)
    for part in (slice(None), slice(None, SPLIT), slice(SPLIT, None)):
        D = mean_denominator(loss_fn, y[part], z[part].shape[0])
        assert D == pytest.approx(_true_denominator(loss_fn, z[part], y[part]), rel=1e-12)


@pytest.mark.skipif(not hasattr(nn, "LinearCrossEntropyLoss"), reason="torch without LinearCrossEntropyLoss")
def test_linear_cross_entropy_denominator():
    torch.manual_seed(0)
    loss_fn = nn.LinearCrossEntropyLoss(3, C, weight=W, dtype=torch.float64)
    h = torch.randn(N, 3, generator=_g(0), dtype=torch.float64)
    assert mean_denominator(loss_fn, IGNORED, N) == pytest.approx(_true_denominator(loss_fn, h, IGNORED), rel=1e-12)


def _truth(model, loss_fn, X, y):
    """Dense Hessian, GGN (autograd output Hessian) and empirical Fisher on the concatenated data."""
    H = dense_hessian(model, loss_fn, X, y)
    J = dense_jacobian(model, X)
    with torch.no_grad():
        z = model.eval()(X)
    Hz = torch.autograd.functional.hessian(lambda v: loss_fn(v.reshape(z.shape), y), z.reshape(-1))
    G = J.T @ Hz @ J
    EF, D = _empirical_fisher_truth(model, loss_fn, X, y)
    return H, G, EF, D


NO_SECOND_DERIVATIVE = {"multi_margin", "multilabel_margin"}  # aten::multi*_margin_loss_backward


def _empirical_fisher_truth(model, loss_fn, X, y):
    with torch.no_grad():
        z = model.eval()(X)
    loss_sum = _with_reduction(loss_fn, "sum")
    grads = torch.stack([dense_gradient(model, loss_sum, X[i:i + 1], y[i:i + 1]) for i in range(N)])
    return grads.T @ grads / _true_denominator(loss_fn, z, y), _true_denominator(loss_fn, z, y)


@pytest.mark.parametrize("name", sorted(NO_SECOND_DERIVATIVE))
def test_losses_without_second_derivative(name):
    model, loss_fn, X, y = CONFIGS[name]()
    EF, D = _empirical_fisher_truth(model, loss_fn, X, y)
    V = torch.randn(EF.shape[0], 2, generator=_g(10), dtype=torch.float64)
    ef = FisherOperator(model, loss_fn, _batches(X, y), kind="empirical") @ V
    assert rel_err(ef, EF @ V) < EXACT
    ef_sum = FisherOperator(model, _with_reduction(loss_fn, "sum"), _batches(X, y), kind="empirical") @ V
    assert rel_err(ef_sum, D * ef) < EXACT  # EF = c sum r r^T: c = 1 for a sum, 1 / D for the mean
    with pytest.raises(NotImplementedError, match=f"{type(loss_fn).__name__} has no second derivative"):
        GGNOperator(model, loss_fn, _batches(X, y)) @ V


@pytest.mark.parametrize("name", sorted(set(CONFIGS) - NO_SECOND_DERIVATIVE))
def test_unequal_batches_equal_the_full_batch(name):
    model, loss_fn, X, y = CONFIGS[name]()
    H, G, EF, D = _truth(model, loss_fn, X, y)
    V = torch.randn(H.shape[0], 2, generator=_g(10), dtype=torch.float64)
    data = _batches(X, y)
    assert rel_err(HessianOperator(model, loss_fn, data) @ V, H @ V) < EXACT
    ggn = GGNOperator(model, loss_fn, data) @ V
    assert rel_err(ggn, G @ V) < EXACT
    assert rel_err(FisherOperator(model, loss_fn, data, kind="empirical") @ V, EF @ V) < EXACT
    # reduction="sum" is D_total times the mean
    assert rel_err(GGNOperator(model, _with_reduction(loss_fn, "sum"), data) @ V, D * ggn) < EXACT
    if loss_spec(loss_fn).family is not None and getattr(loss_fn, "weight", None) is None \
            and getattr(loss_fn, "pos_weight", None) is None:
        assert rel_err(FisherOperator(model, loss_fn, data, kind="exact") @ V, G @ V) < EXACT


# ----------------------------------------------------------------- subclasses and refusals
class FocalLoss(nn.CrossEntropyLoss):
    def forward(self, z, y):
        logp = torch.log_softmax(z, 1).gather(1, y[:, None]).squeeze(1)
        return (-(1 - logp.exp()) ** 2 * logp).mean()


class HalfMSE(nn.MSELoss):
    def forward(self, z, y):
        return 0.5 * super().forward(z, y)


class RenamedCE(nn.CrossEntropyLoss):  # keeps the parent's forward: keeps the table entry
    pass


class CustomLoss(nn.Module):
    reduction = "mean"

    def forward(self, z, y):
        return torch.log(torch.cosh(z - y)).mean()


def _autograd_ggn(model, loss_fn, X, y):
    J = dense_jacobian(model, X)
    with torch.no_grad():
        z = model.eval()(X)
    Hz = torch.autograd.functional.hessian(lambda v: loss_fn(v.reshape(z.shape), y), z.reshape(-1))
    return J.T @ Hz @ J


@pytest.mark.parametrize("loss_fn,y", [(FocalLoss(), LABELS),
                                       (HalfMSE(), torch.randn(N, C, generator=_g(7), dtype=torch.float64))],
                         ids=["focal", "half_mse"])
def test_subclass_overriding_forward_gets_autograd_and_refusals(loss_fn, y):
    model, X = _model(), _inputs()
    assert loss_spec(loss_fn) is None
    G = _autograd_ggn(model, loss_fn, X, y)
    assert rel_err(GGNOperator(model, loss_fn, (X, y)).to_dense(), G) < EXACT
    for kind in ("exact", "mc"):
        with pytest.raises(NotImplementedError, match="forward is not"):
            FisherOperator(model, loss_fn, (X, y), kind=kind)
    with pytest.raises(MeanDenominatorError, match="reduction='sum'.*single batch.*denominator="):
        GGNOperator(model, loss_fn, _batches(X, y))
    with pytest.raises(MeanDenominatorError):
        HessianOperator(model, loss_fn, _batches(X, y))
    with pytest.raises(MeanDenominatorError, match="denominator="):
        FisherOperator(model, loss_fn, (X, y), kind="empirical")
    # an explicit denominator: the loader equals the full batch again
    count = (lambda X, y: float(y.numel())) if isinstance(loss_fn, nn.MSELoss) else (lambda X, y: float(len(y)))
    V = torch.randn(G.shape[0], 2, generator=_g(11), dtype=torch.float64)
    assert rel_err(GGNOperator(model, loss_fn, _batches(X, y), denominator=count) @ V, G @ V) < EXACT
    H = dense_hessian(model, loss_fn, X, y)
    assert rel_err(HessianOperator(model, loss_fn, _batches(X, y), denominator=count) @ V, H @ V) < EXACT
    loss_sum = HalfMSE(reduction="sum") if isinstance(loss_fn, nn.MSELoss) else None
    if loss_sum is not None:  # EF with the explicit denominator against explicit outer products
        grads = torch.stack([dense_gradient(model, loss_sum, X[i:i + 1], y[i:i + 1]) for i in range(N)])
        EF = FisherOperator(model, loss_fn, _batches(X, y), kind="empirical", denominator=count)
        # batch loss = (1/2) sum / D = c sum (1/2 err^2): EF = c sum g g^T with g of the per-example half-SSE
        assert rel_err(EF @ V, grads.T @ grads / y.numel() @ V) < EXACT


def test_subclass_keeping_forward_keeps_the_closed_form():
    assert loss_spec(RenamedCE()) is LOSS_TABLE[nn.CrossEntropyLoss]
    hooked = nn.CrossEntropyLoss()
    hooked.register_forward_hook(lambda m, inp, out: 2 * out)
    assert loss_spec(hooked) is None  # a hook may change the value


def test_unknown_losses_refused_over_batches_but_not_on_one_batch():
    model, X = _model(), _inputs()
    y = torch.randn(N, C, generator=_g(7), dtype=torch.float64)
    loss_fn = CustomLoss()
    with pytest.raises(MeanDenominatorError, match="CustomLoss"):
        GGNOperator(model, loss_fn, _batches(X, y))
    G = _autograd_ggn(model, loss_fn, X, y)
    assert rel_err(GGNOperator(model, loss_fn, [(X, y)]).to_dense(), G) < EXACT  # one batch: no weights
    with pytest.raises(MeanDenominatorError, match="CTCLoss.*target lengths"):
        mean_denominator(nn.CTCLoss(), y, N)
    with pytest.raises(MeanDenominatorError, match="GaussianNLLLoss.*var"):
        mean_denominator(nn.GaussianNLLLoss(), y, N)
    with pytest.raises(TypeError, match="denominator must be a callable"):
        GGNOperator(model, loss_fn, (X, y), denominator=3.0)


def test_plain_function_mean_is_the_mean_over_examples():
    model, X = _model(), _inputs()
    y = torch.randn(N, C, generator=_g(7), dtype=torch.float64)

    def per_example_mean(z, t):  # the documented contract of reduction="mean" for functions
        return torch.log(torch.cosh(z - t)).sum() / z.shape[0]

    H = dense_hessian(model, per_example_mean, X, y)
    V = torch.randn(H.shape[0], 2, generator=_g(12), dtype=torch.float64)
    op = HessianOperator(model, per_example_mean, _batches(X, y), reduction="mean")
    assert rel_err(op @ V, H @ V) < EXACT


def test_kl_batchmean_over_batches_is_the_full_batch_hessian():
    """Issue 11 item 3: batchmean was 7.7x off over a loader (batches weighted by 1 / #batches)."""
    model, loss_fn, X, y = CONFIGS["kl_batchmean"]()
    H = dense_hessian(model, loss_fn, X, y)
    op = HessianOperator(model, loss_fn, [(X[:2], y[:2]), (X[2:4], y[2:4]), (X[4:], y[4:])])
    assert rel_err(op.to_dense(), H) < EXACT


# ------------------------------------------------------------------- closed forms vs autograd
CLOSED_FORM_CASES = {
    "ce_soft_not_normalised": (nn.CrossEntropyLoss(), (N, C), _soft_targets()),
    "ce_soft_weight_smooth": (nn.CrossEntropyLoss(weight=W, label_smoothing=0.3), (N, C), _soft_targets()),
    "ce_weight_ignore_smooth": (nn.CrossEntropyLoss(weight=W, label_smoothing=0.2), (N, C), IGNORED),
    "ce_BCT_ignore": (nn.CrossEntropyLoss(), (N, C, T), _seq_targets()),
    "ce_unbatched": (nn.CrossEntropyLoss(weight=W), (C,), torch.tensor(2)),
    "token_shift": (TokenCrossEntropyLoss(shift=True), (N, T, C), _seq_targets()),
    "token_smooth_sum": (TokenCrossEntropyLoss(label_smoothing=0.2, reduction="sum"), (N, T, C), _seq_targets()),
    "mse_BTD": (nn.MSELoss(), (N, T, C), torch.randn(N, T, C, generator=_g(3), dtype=torch.float64)),
    "bce": (nn.BCEWithLogitsLoss(reduction="sum"), (N, C), _binary()),
}


@pytest.mark.parametrize("name", list(CLOSED_FORM_CASES))
def test_closed_form_output_hessian_and_factor_equal_autograd(name):
    loss_fn, shape, y = CLOSED_FORM_CASES[name]
    z = torch.randn(shape, generator=_g(13), dtype=torch.float64)
    Hz = torch.autograd.functional.hessian(lambda v: loss_fn(v.reshape(shape), y), z.reshape(-1))
    m = z.numel()
    lam = ClosedFormOutputHessian(loss_fn, z, loss_fn.reduction, y)
    dense = lam.matmat(torch.eye(m, dtype=z.dtype).reshape(m, *shape)).reshape(m, m)
    assert rel_err(dense, Hz) < EXACT
    if z.dim() >= 2:  # the per-position factor (for K-FAC): sum_i S[i] S[i]^T
        S = output_hessian_sqrt(loss_fn, z, loss_fn.reduction, y)
        d = 1 if isinstance(loss_fn, nn.CrossEntropyLoss) else z.dim() - 1
        index = torch.arange(m).reshape(shape).movedim(d, -1).reshape(-1, shape[d])  # [positions, C]
        factors = S.movedim(d + 1, -1).reshape(shape[d], -1, shape[d])  # [C', positions, C]
        blocks = torch.zeros(m, m, dtype=z.dtype)
        for pos, idx in enumerate(index):
            blocks[idx[:, None], idx[None, :]] = factors[:, pos].T @ factors[:, pos]
        assert rel_err(blocks, Hz) < EXACT


def test_soft_targets_ggn_and_exact_fisher_and_mc_scaling():
    """Issue 11 item 7: rows that do not sum to one (a zero padding row) were 43-50% off."""
    model, loss_fn, X, y = CONFIGS["ce_soft_plain"]()
    G = _autograd_ggn(model, loss_fn, X, y)
    assert rel_err(GGNOperator(model, loss_fn, (X, y)).to_dense(), G) < EXACT
    assert rel_err(FisherOperator(model, loss_fn, (X, y), kind="exact").to_dense(), G) < EXACT
    with torch.no_grad():
        z = model(X)
    S = sample_output_gradients(loss_fn, z, "mean", 2, _g(14), y)  # [M, N, C]
    mass = y.sum(1)
    resid = torch.softmax(z, 1) - S / torch.sqrt(mass[:, None] / N / 2).clamp(min=1e-300)
    counted = mass > 0
    assert torch.equal(S[:, ~counted], torch.zeros_like(S[:, ~counted]))  # the padding row
    assert torch.allclose(resid[:, counted].sum(-1), torch.ones(2, int(counted.sum()), dtype=z.dtype))
    assert bool(((resid[:, counted].abs() < 1e-12) | ((resid[:, counted] - 1).abs() < 1e-12)).all())


def test_fisher_refuses_class_weights():
    model, loss_fn, X, y = CONFIGS["ce_weight_ignore_smooth"]()
    with pytest.raises(NotImplementedError, match="class weights"):
        FisherOperator(model, loss_fn, (X, y), kind="mc")


# ------------------------------------------------------------------------- token-level CE
def test_token_cross_entropy_forward_and_bad_shapes():
    logits = torch.randn(N, T, C, generator=_g(15), dtype=torch.float64)
    y = _seq_targets()
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, C), y[:, 1:].reshape(-1), label_smoothing=0.1)
    assert torch.allclose(TokenCrossEntropyLoss(shift=True, label_smoothing=0.1)(logits, y), ref, rtol=1e-14)
    per_token = TokenCrossEntropyLoss(reduction="none")(logits, y)
    assert per_token.shape == (N, T) and bool((per_token[y == -100] == 0).all())
    with pytest.raises(ValueError, match=r"logits \[B, T, V\]"):
        TokenCrossEntropyLoss()(logits.transpose(1, 2), y)
    with pytest.raises(ValueError, match="integer class targets"):
        TokenCrossEntropyLoss()(logits, y.double())


def test_token_mc_fisher_samples_only_counted_tokens():
    model, loss_fn, X, y = CONFIGS["token_ce_shift_smooth"]()
    op = FisherOperator(model, loss_fn, (X, y), kind="mc", mc_samples=3, seed=4)
    with torch.no_grad():
        z = model(X)
    S = sample_output_gradients(loss_fn, z, "mean", 3, op._batch_generator(0), y)  # [M, N, T, C]
    counted = torch.cat([y[:, 1:] != -100, torch.zeros(N, 1, dtype=torch.bool)], 1)
    D = float(counted.sum())
    assert torch.equal(S[:, ~counted], torch.zeros_like(S[:, ~counted]))
    onehot = torch.softmax(z, -1)[counted] - S[:, counted] / math.sqrt(1 / D / 3)
    assert torch.allclose(onehot.sum(-1), torch.ones(3, int(D), dtype=z.dtype))
    assert bool(((onehot.abs() < 1e-12) | ((onehot - 1).abs() < 1e-12)).all())
    J = dense_jacobian(model, X)  # rows in z's (N, T, C) order
    Sf = S.reshape(3, N, -1)
    truth = J.T @ torch.block_diag(*[Sf[:, b].T @ Sf[:, b] for b in range(N)]) @ J
    assert rel_err(op.to_dense(), truth) < EXACT


def _token_gradients(model, X, y, shift):
    """Per-token gradients of the per-token loss (explicit loop over counted tokens)."""
    params = [p for p in model.parameters()]
    rows, seqs = [], []
    for b in range(N):
        seq = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
        for t in range(T):
            target_t = t + 1 if shift else t
            if target_t >= T or int(y[b, target_t]) == -100:
                continue
            z = model(X[b:b + 1])[0, t]
            g = flat(torch.autograd.grad(F.cross_entropy(z[None], y[b, target_t][None]), params))
            rows.append(g)
            seq += g
        seqs.append(seq)
    return torch.stack(rows), torch.stack(seqs)


@pytest.mark.parametrize("shift", [False, True])
def test_token_empirical_fisher_granularities_against_explicit_outer_products(shift):
    model, _, X, y = CONFIGS["token_ce"]()
    loss_fn = TokenCrossEntropyLoss(shift=shift)
    tok, seq = _token_gradients(model, X, y, shift)
    D = tok.shape[0]  # counted tokens
    data = _batches(X, y)
    ef_tok = FisherOperator(model, loss_fn, data, kind="empirical", ef_granularity="token").to_dense()
    ef_seq = FisherOperator(model, loss_fn, data, kind="empirical").to_dense()
    assert rel_err(ef_tok, tok.T @ tok / D) < EXACT
    assert rel_err(ef_seq, seq.T @ seq / D) < EXACT
    assert rel_err(ef_tok, ef_seq) > 0.05  # the conventions really differ on sequences


def test_token_empirical_fisher_equals_curvlinops():
    """curvlinops' EFLinearOperator is the "token" convention (one batch, no ignored targets)."""
    curvlinops = pytest.importorskip("curvlinops")
    X = _inputs(True)
    y = torch.randint(0, C, (N, T), generator=_g(16))
    ymse = torch.randn(N, T, C, generator=_g(17), dtype=torch.float64)
    for model, loss_fn, target in [(nn.Sequential(_model(), _Transpose()), nn.CrossEntropyLoss(), y),
                                   (_model(), nn.MSELoss(), ymse)]:
        params = list(model.parameters())
        n = sum(p.numel() for p in params)
        V = torch.randn(n, 2, generator=_g(19), dtype=torch.float64)
        peer = curvlinops.EFLinearOperator(model, loss_fn, params, [(X, target)], check_deterministic=False)
        theirs = peer @ V
        ours = FisherOperator(model, loss_fn, (X, target), kind="empirical", ef_granularity="token") @ V
        assert rel_err(ours, theirs) < 1e-9
        seq = FisherOperator(model, loss_fn, (X, target), kind="empirical") @ V
        assert rel_err(seq, theirs) > 0.05


def test_token_loss_equals_cross_entropy_on_transposed_logits():
    """The same tokens through TokenCrossEntropyLoss ([B, T, V]) and nn.CrossEntropyLoss ([B, V, T])."""
    model, token_loss, X, y = CONFIGS["token_ce"]()
    transposed = nn.Sequential(model, _Transpose())
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, generator=_g(18), dtype=torch.float64)
    for op in (GGNOperator, lambda *a: FisherOperator(*a, kind="exact"),
               lambda *a: FisherOperator(*a, kind="empirical", ef_granularity="token")):
        a = op(model, token_loss, _batches(X, y)) @ V
        b = op(transposed, nn.CrossEntropyLoss(), _batches(X, y)) @ V
        assert rel_err(a, b) < EXACT


def test_ef_granularity_validation():
    model, loss_fn, X, y = CONFIGS["ce_sequence_BCT"]()

    class SeqFocal(nn.CrossEntropyLoss):  # class dim 1, but unknown to the table
        def forward(self, z, t):
            return super().forward(z, t) ** 2

    op = FisherOperator(model, SeqFocal(reduction="sum"), (X, y), kind="empirical", ef_granularity="token")
    with pytest.raises(ValueError, match="Which output dim"):
        op @ torch.ones(op.shape[0], dtype=torch.float64)
    with pytest.raises(ValueError, match="ef_granularity"):
        FisherOperator(model, loss_fn, (X, y), kind="empirical", ef_granularity="example")
    with pytest.raises(ValueError, match="kind='empirical' only"):
        FisherOperator(model, loss_fn, (X, y), kind="mc", ef_granularity="token")


def test_docstring_examples_run():
    import doctest

    import curvature.fisher
    import curvature.losses

    for module in (curvature.losses, curvature.fisher):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0
