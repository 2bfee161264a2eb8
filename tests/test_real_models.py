"""Models people bring: a ResNet-style block with train-mode BatchNorm, tied embedding/output weights.

Truth: dense matrices by double backward row by row (train-mode truth evaluates with batch
statistics and restores the running buffers), cross-checked by central finite differences.
"""

import copy

import pytest
import torch
from torch import nn

import curvature
from tests.dense_truth import dense_ggn, dense_hessian, fd_hessian, rel_err


class ResBlock(nn.Module):
    """The basic block of torchvision's ResNet (written here: torchvision is not imported)."""

    def __init__(self, c: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def resnet_tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), ResBlock(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(3, 4)).double()


class TiedLM(nn.Module):
    """Embedding and output projection share one weight (GPT-2 style weight tying)."""

    def __init__(self, V: int = 7, D: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mix(self.embed(x)))).mean(1)


def _train_mode_hessian(model, loss_fn, X, y):
    """Dense Hessian with batch statistics (train mode), buffers restored afterwards."""
    m = copy.deepcopy(model).train()
    names = [n for n, _ in m.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    shapes = [p.shape for p in m.parameters()]
    buffers = {n: b.clone() for n, b in m.named_buffers()}

    def loss_of(flat):
        pieces, i = {}, 0
        for n, s in zip(names, shapes):
            k = s.numel()
            pieces[n] = flat[i:i + k].reshape(s)
            i += k
        out = torch.func.functional_call(m, ({**pieces}, {k: v.clone() for k, v in buffers.items()}), (X,))
        return loss_fn(out, y)

    return torch.autograd.functional.hessian(loss_of, flat0), loss_of, flat0


@pytest.fixture(scope="module")
def resnet_case():
    net = resnet_tiny()
    X = torch.randn(5, 1, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 1])
    return net, nn.CrossEntropyLoss(), X, y


def test_train_mode_batchnorm_hessian_equals_truth(resnet_case):
    net, loss_fn, X, y = resnet_case
    H_true, loss_of, flat0 = _train_mode_hessian(net, loss_fn, X, y)
    # the truth itself against central finite differences of the gradient
    eps, v = 1e-5, torch.randn(flat0.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    g = torch.func.grad(loss_of)
    fd = (g(flat0 + eps * v) - g(flat0 - eps * v)) / (2 * eps)
    assert rel_err(H_true @ v, fd) < 1e-6
    before = {n: b.clone() for n, b in net.named_buffers()}
    H = curvature.HessianOperator(net, loss_fn, (X, y), mode="train")
    assert rel_err(H.to_dense(), H_true) < 1e-10
    for n, b in net.named_buffers():  # running statistics untouched
        assert torch.equal(b, before[n])


@pytest.mark.parametrize("jvp", ["auto", "reverse", "forward"])
def test_train_mode_batchnorm_ggn_every_jvp_path(resnet_case, jvp):
    """Forward AD through train-mode BatchNorm fails in torch: 'auto' must choose reverse; explicit
    'forward' must either be right or refuse with a message (never an internal error or a wrong number)."""
    net, loss_fn, X, y = resnet_case
    m = copy.deepcopy(net).train()
    # GGN truth with batch statistics: J by rows of the train-mode Jacobian, closed-form CE output Hessian
    names = [n for n, _ in m.named_parameters()]
    shapes = [p.shape for p in m.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    buffers = {n: b.clone() for n, b in m.named_buffers()}

    def out_of(flat):
        pieces, i = {}, 0
        for n, s in zip(names, shapes):
            pieces[n] = flat[i:i + s.numel()].reshape(s)
            i += s.numel()
        return torch.func.functional_call(m, ({**pieces}, {k: v.clone() for k, v in buffers.items()}), (X,))

    J = torch.autograd.functional.jacobian(out_of, flat0).reshape(-1, flat0.numel())  # [B*C, n]
    z = out_of(flat0).detach()
    p = torch.softmax(z, 1)
    Lam = torch.block_diag(*[(torch.diag(pi) - torch.outer(pi, pi)) / z.shape[0] for pi in p])
    G_true = J.T @ Lam @ J
    try:
        G = curvature.GGNOperator(net, loss_fn, (X, y), mode="train", jvp=jvp)
        D = G.to_dense()
    except (ValueError, NotImplementedError) as exc:
        assert jvp == "forward", f"jvp={jvp!r} must work: {exc}"
        assert "forward" in str(exc)
        return
    assert rel_err(D, G_true) < 1e-10
    assert rel_err(D, D.T) < 1e-12


def test_tied_weights_every_operator():
    torch.manual_seed(0)
    m = TiedLM().double()
    X = torch.randint(0, 7, (6, 3), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 7, (6,), generator=torch.Generator().manual_seed(1))
    loss_fn = nn.CrossEntropyLoss()
    assert [n for n, _ in m.named_parameters()] == ["embed.weight", "mix.weight", "mix.bias"]
    H_true = dense_hessian(m, loss_fn, X, y)
    assert rel_err(H_true, fd_hessian(m, loss_fn, X, y)) < 1e-6
    assert rel_err(curvature.HessianOperator(m, loss_fn, (X, y)).to_dense(), H_true) < 1e-10
    G_true = dense_ggn(m, loss_fn, X, y)
    for jvp in ("auto", "reverse", "forward"):
        assert rel_err(curvature.GGNOperator(m, loss_fn, (X, y), jvp=jvp).to_dense(), G_true) < 1e-10
    F = curvature.FisherOperator(m, loss_fn, (X, y), kind="exact").to_dense()
    assert rel_err(F, G_true) < 1e-10
