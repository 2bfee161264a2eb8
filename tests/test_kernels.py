"""curvature.kernels: attention, weight norm and hardsigmoid without rewrites; the GGN's forward-mode choice.

Truth is independent of the code under test: dense matrices by double backward row by
row (tests/dense_truth.py) computed under PyTorch's own ``sdpa_kernel(SDPBackend.MATH)``
(the math back end is exact), explicit Jacobians (first derivatives, which PyTorch gets
right for every op here), and central finite differences of the gradient where
PyTorch's double backward itself is wrong or missing (weight norm, hardsigmoid).
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils import parametrizations

import curvature
from curvature import FisherOperator, GGNOperator, HessianOperator
from curvature.kernels import (
    MissingDerivativeError,
    _FORWARD_VERIFIED,
    _hardsigmoid_relu6,
    derivative_kernels,
    forward_mode_problems,
    forward_mode_verified,
)
from curvature.losses import sample_output_gradients
from models import OnceDifferentiableTanh
from dense_truth import (
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    dense_jacobian,
    dense_lowrank_fisher,
    fd_hessian,
    flat,
    loss_of_flat,
    rel_err,
    trainable,
)

D = torch.float64
EXACT = 1e-10
FD = 1e-6  # central differences, eps 1e-5, float64


def _finish(model, seed=0):
    g = torch.Generator().manual_seed(seed + 7)
    model = model.to(D)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=D))
    return model.eval()


def _settings():
    """Every setting the context touches: SDPA back ends and priority, the MHA fast path, torch function modes."""
    return (torch._C._get_flash_sdp_enabled(), torch._C._get_mem_efficient_sdp_enabled(),
            torch._C._get_math_sdp_enabled(), torch._C._get_cudnn_sdp_enabled(),
            tuple(torch._C._get_sdp_priority_order()), torch.backends.mha.get_fastpath_enabled(),
            torch._C._len_torch_function_stack())


# ------------------------------------------------------------------------ models
class EncoderClassifier(nn.Module):
    """``Linear -> TransformerEncoder (1 layer) -> mean over tokens -> Linear``, optionally causal."""

    def __init__(self, causal: bool, d_in=2, width=4, classes=3):
        super().__init__()
        self.causal = causal
        self.embed = nn.Linear(d_in, width)
        layer = nn.TransformerEncoderLayer(width, 2, dim_feedforward=4, dropout=0.0, batch_first=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # enable_nested_tensor note
            self.encoder = nn.TransformerEncoder(layer, 1)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        T = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=x.dtype) if self.causal else None
        return self.head(self.encoder(self.embed(x), mask=mask, is_causal=self.causal).mean(1))


class MHAClassifier(nn.Module):
    def __init__(self, need_weights: bool, d_in=2, width=4, classes=3):
        super().__init__()
        self.need_weights = need_weights
        self.embed = nn.Linear(d_in, width)
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        a, _ = self.attn(h, h, h, need_weights=self.need_weights)
        return self.head((h + a).mean(1))


class CausalSDPA(nn.Module):
    """A custom attention block calling ``F.scaled_dot_product_attention(..., is_causal=True)``."""

    def __init__(self, d_in=2, width=4, heads=2, classes=3):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_in, 3 * width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(a.transpose(1, 2).reshape(B, T, -1)[:, -1])


class MobileNetV3Block(nn.Module):
    """Inverted residual with squeeze-excitation (hardswish, hardsigmoid) as in MobileNetV3."""

    def __init__(self, c_in=1, expand=4, squeeze=2, classes=3, hardsigmoid=None):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(c_in, expand, 1), nn.BatchNorm2d(expand), nn.Hardswish())
        self.depthwise = nn.Sequential(nn.Conv2d(expand, expand, 3, padding=1, groups=expand), nn.Hardswish())
        self.se_reduce = nn.Conv2d(expand, squeeze, 1)
        self.se_expand = nn.Conv2d(squeeze, expand, 1)
        self.gate = nn.Hardsigmoid() if hardsigmoid is None else hardsigmoid
        self.project = nn.Conv2d(expand, 2, 1)
        self.head = nn.Linear(2, classes)

    def forward(self, x):
        h = self.depthwise(self.expand(x))
        s = self.gate(self.se_expand(F.relu(self.se_reduce(F.adaptive_avg_pool2d(h, 1)))))
        return self.head(self.project(h * s).mean((2, 3)))


def _tokens_data(seed=0, B=3, T=3, d_in=2, classes=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, d_in, generator=g, dtype=D), torch.randint(0, classes, (B,), generator=g)


def _image_data(seed=0, B=3, classes=3):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(B, 1, 4, 4, generator=g, dtype=D), torch.randint(0, classes, (B,), generator=g)


def _probe(n, k=2, seed=1):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=D)


def _hvp(model, loss_fn, X, y, V):
    """``H V`` by plain double backward through the flattened parameters (run under the caller's kernels)."""
    f = loss_of_flat(model, loss_fn, X, y)
    theta = flat(trainable(model)).requires_grad_(True)
    model.eval()
    (g,) = torch.autograd.grad(f(theta), theta, create_graph=True)
    return torch.stack([torch.autograd.grad(g, theta, v, retain_graph=True)[0] for v in V.T], 1)


def _fd_hvp(model, loss_fn, X, y, V, eps=1e-5):
    """``H V`` by central differences of the (first-order, correct) gradient along each column of ``V``."""
    f = loss_of_flat(model, loss_fn, X, y)
    theta0 = flat(trainable(model))

    def grad(theta):
        theta = theta.clone().requires_grad_(True)
        return torch.autograd.grad(f(theta), theta)[0]

    return torch.stack([(grad(theta0 + eps * v) - grad(theta0 - eps * v)) / (2 * eps) for v in V.T], 1)


def _check_every_operator(model, X, y, HV_truth, tol=EXACT):
    """Hessian (both paths), GGN (both modes), Fisher (exact / empirical / mc) against dense truth."""
    loss_fn = nn.CrossEntropyLoss()
    with sdpa_kernel(SDPBackend.MATH):
        G = dense_ggn(model, loss_fn, X, y)
        EF = dense_empirical_fisher(model, loss_fn, X, y)
        with torch.no_grad():
            z = model(X)
    V = _probe(G.shape[0])
    assert HV_truth.shape == V.shape
    before = _settings()
    for product in ("double_backward", "jvp_grad"):
        assert rel_err(HessianOperator(model, loss_fn, (X, y), product=product) @ V, HV_truth) < tol, product
    for jvp in ("reverse", "forward", "auto"):
        assert rel_err(GGNOperator(model, loss_fn, (X, y), jvp=jvp) @ V, G @ V) < tol, jvp
    assert rel_err(FisherOperator(model, loss_fn, (X, y), kind="exact") @ V, G @ V) < tol
    assert rel_err(FisherOperator(model, loss_fn, (X, y), kind="empirical", jvp="forward") @ V, EF @ V) < tol
    mc = FisherOperator(model, loss_fn, (X, y), kind="mc", mc_samples=2, seed=5)
    S = sample_output_gradients(loss_fn, z, "mean", 2, mc._batch_generator(0))
    with sdpa_kernel(SDPBackend.MATH):
        MC = dense_lowrank_fisher(model, X, S)
    assert rel_err(mc @ V, MC @ V) < tol
    assert _settings() == before


# ------------------------------------------------------------------------ attention
ATTENTION = {
    "encoder": lambda: EncoderClassifier(causal=False),
    "encoder_causal": lambda: EncoderClassifier(causal=True),
    "mha_need_weights": lambda: MHAClassifier(need_weights=True),
    "mha_no_weights": lambda: MHAClassifier(need_weights=False),
    "sdpa_is_causal": lambda: CausalSDPA(),
}


@pytest.mark.parametrize("name", list(ATTENTION))
def test_attention_models_every_operator_equals_math_kernel_truth(name):
    torch.manual_seed(0)
    model = _finish(ATTENTION[name]())
    X, y = _tokens_data()
    loss_fn = nn.CrossEntropyLoss()
    V = _probe(sum(p.numel() for p in model.parameters()))
    with sdpa_kernel(SDPBackend.MATH):
        if name == "sdpa_is_causal":  # one dense matrix, row by row
            HV = dense_hessian(model, loss_fn, X, y) @ V
        else:
            HV = _hvp(model, loss_fn, X, y, V)
    if name == "encoder_causal":  # the truth itself, cross-checked once by finite differences
        assert rel_err(HV, _fd_hvp(model, loss_fn, X, y, V)) < FD
    _check_every_operator(model, X, y, HV)


def test_default_kernels_fail_in_plain_torch_so_the_context_matters():
    """Without the context PyTorch's default CPU attention has no double backward (the bug being routed around)."""
    model = _finish(CausalSDPA())
    X, y = _tokens_data()
    p = next(model.parameters())
    g = torch.autograd.grad(F.cross_entropy(model(X), y), p, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="scaled_dot_product"):
        torch.autograd.grad(g.sum(), p)
    with derivative_kernels(model, needs="second"):
        g = torch.autograd.grad(F.cross_entropy(model(X), y), p, create_graph=True)[0]
    assert torch.isfinite(torch.autograd.grad(g.sum(), p)[0]).all()


def test_user_settings_restored_also_when_the_body_raises():
    previous = torch.backends.mha.get_fastpath_enabled()
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):  # a user's non-default
            torch.backends.mha.set_fastpath_enabled(True)
            before = _settings()
            model = _finish(MobileNetV3Block())  # the op-rewriting mode is entered too
            with pytest.raises(ZeroDivisionError):
                with derivative_kernels(model):
                    assert _settings() != before
                    assert torch._C._get_math_sdp_enabled() and not torch._C._get_flash_sdp_enabled()
                    assert not torch.backends.mha.get_fastpath_enabled()
                    1 / 0
            assert _settings() == before
            X, y = _image_data()
            HessianOperator(model, nn.CrossEntropyLoss(), (X, y)) @ _probe(sum(p.numel() for p in model.parameters()))
            assert _settings() == before
            torch.backends.mha.set_fastpath_enabled(False)
            with derivative_kernels(model):
                pass
            assert not torch.backends.mha.get_fastpath_enabled()
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def test_models_without_special_modules_get_no_function_mode():
    """Cost nothing: no TorchFunctionMode unless the model has weight norm or nn.Hardsigmoid; 'first' changes nothing."""
    before = _settings()
    with derivative_kernels(_finish(EncoderClassifier(causal=False))):
        assert torch._C._len_torch_function_stack() == before[-1]
    with derivative_kernels(_finish(MobileNetV3Block())):
        assert torch._C._len_torch_function_stack() == before[-1] + 1
    with derivative_kernels(None, needs="first"):
        assert _settings() == before
    with pytest.raises(ValueError, match="needs"):
        with derivative_kernels(None, needs="third"):
            pass


# ------------------------------------------------------------------------ hardswish / hardsigmoid
def test_hardsigmoid_rewrite_is_the_same_function_with_the_same_derivative():
    """Same values bit for bit, same derivative pattern at the kinks; slope exactly 1/6 (PyTorch's is float32's 1/6)."""
    grid = torch.linspace(-5, 5, 10001, dtype=D)
    assert torch.equal(F.hardsigmoid(grid), _hardsigmoid_relu6(grid))
    x = torch.tensor([-4.0, -3.0, -2.5, 0.0, 1.0, 3.0, 3.5], dtype=D, requires_grad=True)
    a, b = F.hardsigmoid(x), _hardsigmoid_relu6(x)
    assert torch.equal(a, b)
    ga, gb = torch.autograd.grad(a.sum(), x)[0], torch.autograd.grad(b.sum(), x)[0]
    assert torch.equal(gb, torch.tensor([0, 0, 1 / 6, 1 / 6, 1 / 6, 0, 0], dtype=D))
    assert torch.equal(ga, torch.tensor([0, 0, 1, 1, 1, 0, 0], dtype=D) * torch.tensor(1 / 6, dtype=torch.float32).item())
    y = x.detach().clone()
    assert torch.equal(_hardsigmoid_relu6(y, inplace=True), a.detach()) and torch.equal(y, a.detach())


def test_mobilenetv3_block_every_operator_equals_finite_difference_truth():
    model = _finish(MobileNetV3Block())
    X, y = _image_data()
    loss_fn = nn.CrossEntropyLoss()
    V = _probe(sum(p.numel() for p in model.parameters()))
    with pytest.raises(RuntimeError, match="hardsigmoid_backward"):  # plain torch cannot
        _hvp(model, loss_fn, X, y, V)
    HV = _fd_hvp(model, loss_fn, X, y, V)  # the truth: finite differences of the gradient
    # the GGN / Fisher truth uses PyTorch's hardsigmoid_backward, whose slope is float32's 1/6 (3e-8 off)
    _check_every_operator(model, X, y, HV, tol=FD)


class FunctionalGate(nn.Module):
    def forward(self, x):
        return F.hardsigmoid(x)


def test_functional_hardsigmoid_is_named_and_a_fixed_model_works_without_clear_cache():
    """F.hardsigmoid in a custom forward cannot be seen: named error; then the fixed model works (no stale state)."""
    model = _finish(MobileNetV3Block(hardsigmoid=FunctionalGate()))
    X, y = _image_data()
    loss_fn = nn.CrossEntropyLoss()
    op = HessianOperator(model, loss_fn, (X, y))
    V = _probe(op.shape[0])
    with pytest.raises(MissingDerivativeError, match="'hardsigmoid_backward'.*nn.Hardsigmoid") as info:
        op @ V
    assert info.value.op == "hardsigmoid_backward" and "FiniteDifferenceHessianOperator" in str(info.value)
    model.gate = nn.Hardsigmoid()  # the user's fix; no clear_cache()
    assert rel_err(op @ V, _fd_hvp(model, loss_fn, X, y, V)) < FD
    with pytest.raises(MissingDerivativeError, match="hardsigmoid"):
        model.gate = FunctionalGate()
        GGNOperator(model, loss_fn, (X, y), jvp="reverse") @ V


def test_ops_without_any_needed_derivative_are_named():
    """embedding_bag: no double backward and no forward mode in PyTorch; every path names it."""
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = nn.EmbeddingBag(6, 3, mode="mean")
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(torch.tanh(self.bag(x)))

    model = _finish(Bag())
    X, y = torch.tensor([[0, 1, 2], [3, 4, 5]]), torch.tensor([0, 1])
    V = _probe(sum(p.numel() for p in model.parameters()))
    for op in (HessianOperator(model, nn.CrossEntropyLoss(), (X, y)),
               HessianOperator(model, nn.CrossEntropyLoss(), (X, y), product="jvp_grad"),
               GGNOperator(model, nn.CrossEntropyLoss(), (X, y), jvp="reverse"),
               GGNOperator(model, nn.CrossEntropyLoss(), (X, y), jvp="forward")):
        with pytest.raises(MissingDerivativeError, match="embedding_bag"):
            op @ V


# ------------------------------------------------------------------------ weight norm
def _weight_norm_net(old_style: bool, dim=0):
    torch.manual_seed(0)
    first = nn.Linear(4, 5)
    if old_style:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated in favour of parametrizations
            first = nn.utils.weight_norm(first, dim=dim)
    else:
        first = parametrizations.weight_norm(first, dim=dim)
    return _finish(nn.Sequential(first, nn.Tanh(), nn.Linear(5, 3)))


@pytest.mark.parametrize("old_style,dim", [(False, 0), (False, 1), (True, 0)])
def test_weight_norm_every_operator_equals_finite_difference_truth(old_style, dim):
    model = _weight_norm_net(old_style, dim)
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(6, 4, generator=g, dtype=D), torch.randint(0, 3, (6,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    H_fd = fd_hessian(model, loss_fn, X, y)  # the truth: finite differences of the (correct) gradient
    assert rel_err(dense_hessian(model, loss_fn, X, y), H_fd) > 1e-2  # PyTorch's fused double backward is wrong
    V = _probe(H_fd.shape[0])
    _check_every_operator(model, X, y, H_fd @ V, tol=FD)
    H = HessianOperator(model, loss_fn, (X, y)).to_dense()
    assert rel_err(H, H_fd) < FD and rel_err(H, H.T) < EXACT


# ------------------------------------------------------------------------ GGN forward-mode choice
class TokenConv(nn.Module):
    def __init__(self, padding_idx):
        super().__init__()
        self.embed = nn.Embedding(6, 3, padding_idx=padding_idx)
        self.conv = nn.Conv1d(3, 3, 2)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(self.embed(x).transpose(1, 2))).mean(-1))


class TokenRNN(nn.Module):
    def __init__(self, cell, padding_idx):
        super().__init__()
        self.embed = nn.Embedding(6, 3, padding_idx=padding_idx)
        self.rnn = cell(3, 3, batch_first=True)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(self.rnn(self.embed(x))[0][:, -1])


def _tokens(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 6, (3, 5), generator=g)
    x[0, :2] = 0  # padding tokens
    return x, torch.randint(0, 3, (3,), generator=g)


def _ggn_checks(model, X, y, G, mode="eval"):
    op = GGNOperator(model, nn.CrossEntropyLoss(), (X, y), mode=mode)
    M = op.to_dense()
    assert rel_err(M, G) < EXACT and rel_err(M, M.T) < EXACT
    return op


@pytest.mark.parametrize("make", [lambda: TokenConv(0), lambda: TokenRNN(nn.LSTM, 0), lambda: TokenRNN(nn.GRU, 0),
                                  lambda: nn.Sequential(nn.Embedding(6, 3, padding_idx=0), nn.Conv1d(5, 2, 2),
                                                        nn.Flatten(), nn.Linear(4, 3))],
                         ids=["embedding-conv1d", "embedding-lstm", "embedding-gru", "sequential-embedding-conv1d"])
def test_padding_idx_default_ggn_equals_reverse_truth_and_forward_is_refused(make):
    model = _finish(make())
    X, y = _tokens()
    G = dense_ggn(model, nn.CrossEntropyLoss(), X, y)  # explicit reverse-mode Jacobian: the padding row is frozen
    assert _ggn_checks(model, X, y, G).jvp == "reverse"
    assert forward_mode_problems(model) and not forward_mode_verified(model)
    with pytest.raises(ValueError, match="padding_idx"):
        GGNOperator(model, nn.CrossEntropyLoss(), (X, y), jvp="forward")
    with pytest.raises(ValueError, match="padding_idx"):
        HessianOperator(model, nn.CrossEntropyLoss(), (X, y), product="jvp_grad")


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_rnn_without_padding_forward_mode_is_exact(cell):
    model = _finish(TokenRNN(cell, None))
    X, y = _tokens()
    G = dense_ggn(model, nn.CrossEntropyLoss(), X, y)
    V = _probe(G.shape[0])
    assert rel_err(GGNOperator(model, nn.CrossEntropyLoss(), (X, y), jvp="forward") @ V, G @ V) < EXACT


def _dense_ggn_train(model, X, y):
    """``J^T Lambda J`` in train mode (batch statistics), buffers restored; explicit reverse-mode Jacobian."""
    saved = [b.detach().clone() for b in model.buffers()]
    model.train()
    try:
        params = list(model.parameters())
        z = model(X)
        rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(z.reshape(-1)[i], params, retain_graph=True)])
                for i in range(z.numel())]
    finally:
        model.eval()
        with torch.no_grad():
            for b, s in zip(model.buffers(), saved):
                b.copy_(s)
    J = torch.stack(rows)
    p = torch.softmax(z.detach(), 1)
    Lam = torch.block_diag(*[torch.diag(q) - torch.outer(q, q) for q in p]) / z.shape[0]
    return J.T @ Lam @ J


def test_conv_train_mode_batchnorm_uses_reverse_mode():
    model = _finish(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)))
    X, y = _image_data()
    assert forward_mode_verified(model, "eval") and not forward_mode_verified(model, "train")
    assert _ggn_checks(model, X, y, _dense_ggn_train(model, X, y), mode="train").jvp == "reverse"
    with pytest.raises(ValueError, match="BatchNorm2d in mode='train'"):
        GGNOperator(model, nn.CrossEntropyLoss(), (X, y), mode="train", jvp="forward")
    assert GGNOperator(model, nn.CrossEntropyLoss(), (X, y)).jvp == "forward"  # eval mode: verified


class ConvTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 1)
        self.layer = nn.TransformerEncoderLayer(4, 2, 4, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.layer(self.conv(x).transpose(1, 2)).mean(1))


def test_conv_transformer_ggn_both_modes_equal_truth():
    model = _finish(ConvTransformer())
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(3, 2, 3, generator=g, dtype=D), torch.randint(0, 3, (3,), generator=g)
    with sdpa_kernel(SDPBackend.MATH):
        G = dense_ggn(model, nn.CrossEntropyLoss(), X, y)
    assert _ggn_checks(model, X, y, G).jvp == "reverse"  # a custom forward is not verified
    V = _probe(G.shape[0])
    assert rel_err(GGNOperator(model, nn.CrossEntropyLoss(), (X, y), jvp="forward") @ V, G @ V) < EXACT


class _Contiguous(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (``conv_tbc``'s backward needs that)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


class TBCConv(nn.Module):
    """A width-1 temporal convolution through ``torch.conv_tbc`` (fixed weights): no forward-mode AD in PyTorch."""

    def __init__(self, channels: int):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.register_buffer("weight", torch.randn(1, channels, channels, generator=g, dtype=D))
        self.register_buffer("bias", torch.zeros(channels, dtype=D))

    def forward(self, x):  # [B, C, L] -> [B, C, L]
        out = torch.conv_tbc(x.permute(2, 0, 1).contiguous(), self.weight, self.bias)
        return _Contiguous.apply(out).permute(1, 2, 0)


def test_auto_falls_back_to_reverse_when_forward_mode_fails_at_run_time():
    """A verified model changed after construction: auto switches to reverse mode (exact), explicit forward names the op."""
    model = _finish(nn.Sequential(nn.Conv1d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(9, 3)))
    g = torch.Generator().manual_seed(5)
    X, y = torch.randn(3, 2, 4, generator=g, dtype=D), torch.randint(0, 3, (3,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    auto = GGNOperator(model, loss_fn, (X, y))
    explicit = GGNOperator(model, loss_fn, (X, y), jvp="forward")
    assert auto.jvp == "forward"
    V = _probe(auto.shape[0])
    assert rel_err(auto @ V, dense_ggn(model, loss_fn, X, y) @ V) < EXACT
    model[1] = nn.Sequential(TBCConv(3), nn.Tanh())  # swapped in after construction
    G = dense_ggn(model, loss_fn, X, y)
    assert rel_err(auto @ V, G @ V) < EXACT
    assert auto.jvp == "reverse"
    assert rel_err(auto @ V, G @ V) < EXACT  # and stays there (cached reverse state)
    with pytest.raises(MissingDerivativeError, match="forward-mode derivative for the op 'conv_tbc'"):
        explicit @ V


# ------------------------------------------------------------------------ the verified list
class _Transpose12(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


def _verified_cases():
    """(model, input) pairs that together contain every type of the forward-mode verified list."""
    g = torch.Generator().manual_seed(9)
    return [
        (nn.Sequential(nn.Conv1d(2, 4, 2), nn.ReLU(), nn.MaxPool1d(2), nn.ConvTranspose1d(4, 2, 2), nn.ReLU6(),
                       nn.AvgPool1d(2), nn.AdaptiveAvgPool1d(2), nn.Flatten(), nn.Linear(4, 4), nn.LeakyReLU(0.1),
                       nn.ELU(), nn.SELU(), nn.CELU(), nn.Linear(4, 3)), torch.randn(3, 2, 7, generator=g, dtype=D)),
        (nn.Sequential(nn.Conv2d(1, 2, 2), nn.BatchNorm2d(2), nn.GELU(), nn.MaxPool2d(2), nn.ConvTranspose2d(2, 2, 2),
                       nn.SiLU(), nn.AvgPool2d(2), nn.GroupNorm(1, 2), nn.Mish(), nn.AdaptiveMaxPool2d(2),
                       nn.Hardswish(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Unflatten(1, (2, 1)), nn.Flatten(),
                       nn.Linear(2, 4), nn.Tanh(), nn.Sigmoid(), nn.Hardtanh(), nn.Softplus(),
                       nn.LogSigmoid(), nn.Identity(), nn.Dropout(0.5), nn.LayerNorm(4), nn.BatchNorm1d(4),
                       nn.Linear(4, 3), nn.Softmax(1), nn.LogSoftmax(1)), 2 * torch.randn(3, 1, 7, 7, generator=g, dtype=D)),
        (nn.Sequential(nn.Conv3d(1, 2, 2), nn.BatchNorm3d(2), nn.Flatten(), nn.Linear(16, 3)),
         torch.randn(3, 1, 3, 3, 3, generator=g, dtype=D)),
        (nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 3)), torch.tensor([[0, 1], [2, 4], [4, 4]])),
        (nn.Sequential(nn.Linear(2, 3), nn.Hardsigmoid(), nn.Linear(3, 2)), 4 * torch.randn(5, 2, generator=g, dtype=D)),
    ]


def test_every_verified_type_is_exact_under_forward_mode():
    """Each type on the verified list: forward-mode J v equals the explicit reverse-mode Jacobian (float64)."""
    covered = set()
    for model, X in _verified_cases():
        model = _finish(model)
        covered_before = set(covered)
        covered |= {type(m) for m in model.modules()}
        assert forward_mode_verified(model)
        with torch.no_grad():
            z = model(X)
        J = dense_jacobian(model, X)
        V = _probe(J.shape[1], k=2)
        op = GGNOperator(model, nn.MSELoss(reduction="sum"), (X, torch.zeros_like(z)), jvp="forward")
        # Hardsigmoid: the explicit Jacobian uses PyTorch's hardsigmoid_backward (slope float32's 1/6, 3e-8 off)
        tol = 1e-7 if nn.Hardsigmoid in covered - covered_before else EXACT
        assert rel_err(op @ V, 2 * J.T @ (J @ V)) < tol
    assert covered == set(_FORWARD_VERIFIED)
    hooked = _finish(nn.Sequential(nn.Conv1d(2, 2, 2)))
    hooked[0].register_forward_hook(lambda m, i, o: o)
    assert not forward_mode_verified(hooked)
    assert not forward_mode_verified(_finish(nn.Sequential(_Transpose12(), nn.Conv1d(2, 2, 1))))


class LogCumSumExp(nn.Module):
    def forward(self, x):
        return torch.logcumsumexp(x, dim=1)


def test_double_vjp_ggn_through_a_backward_that_takes_the_log_of_its_gradient():
    """logcumsumexp's backward is NaN at a zero incoming gradient: the double-vjp dummy must not be 0."""
    model = _finish(nn.Sequential(nn.Linear(3, 4), LogCumSumExp(), nn.Linear(4, 3)))
    g = torch.Generator().manual_seed(6)
    X, y = torch.randn(5, 3, generator=g, dtype=D), torch.randint(0, 3, (5,), generator=g)
    G = dense_ggn(model, nn.CrossEntropyLoss(), X, y)
    for jvp in ("reverse", "forward"):
        M = GGNOperator(model, nn.CrossEntropyLoss(), (X, y), jvp=jvp).to_dense()
        assert rel_err(M, G) < EXACT, jvp


class _OnceDifferentiableNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(OnceDifferentiableTanh.apply(self.a(x)))


@pytest.mark.parametrize("make", [
    lambda m, d: curvature.HessianOperator(m, nn.CrossEntropyLoss(), d),
    lambda m, d: curvature.GGNOperator(m, nn.CrossEntropyLoss(), d, jvp="reverse"),
])
def test_once_differentiable_function_is_refused_not_silently_dropped(make):
    """torch drops second derivatives through @once_differentiable without an error (68% off): refuse."""
    torch.manual_seed(0)
    model = _OnceDifferentiableNet().double()
    X, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    op = make(model, (X, y))
    with pytest.raises(curvature.kernels.MissingDerivativeError, match="OnceDifferentiableTanh"):
        op @ torch.randn(op.shape[0], dtype=torch.float64)
    fd = curvature.FiniteDifferenceHessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    assert torch.isfinite(fd @ torch.randn(op.shape[0], dtype=torch.float64)).all()  # the named alternative works
