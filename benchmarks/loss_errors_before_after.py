"""Relative error against dense double-backward truth of issue 11's items 2, 3, 5, 7, for one code tree.

    python benchmarks/loss_errors_before_after.py /path/to/tree   # e.g. a `git archive 79e2a19` export, or .
"""
import sys

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else ".")
sys.path.insert(0, "tests")
import torch  # noqa: E402
from torch import nn  # noqa: E402

import curvature  # noqa: E402
from dense_truth import dense_hessian, dense_jacobian, rel_err  # noqa: E402

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
X = torch.randn(7, 3, generator=g, dtype=torch.float64)
W = torch.tensor([0.5, 2.0, 1.3], dtype=torch.float64)
ignored = torch.tensor([0, -100, 1, 1, -100, -100, 2])
batches = lambda y: [(X[:3], y[:3]), (X[3:], y[3:])]  # noqa: E731


def ggn_truth(net, loss_fn, y):
    J = dense_jacobian(net, X)
    with torch.no_grad():
        z = net(X)
    Hz = torch.autograd.functional.hessian(lambda v: loss_fn(v.reshape(z.shape), y), z.reshape(-1))
    return J.T @ Hz @ J


def report(name, fn):
    try:
        print(f"{name:45s} {fn():.2e}")
    except Exception as err:  # a refusal is an answer too
        print(f"{name:45s} raised {type(err).__name__}: {str(err)[:70]}")


logsm = nn.Sequential(model, nn.LogSoftmax(1))
nll = nn.NLLLoss(weight=W)
report("item 2: NLL weight+ignore Hessian, 2 batches",
       lambda: rel_err(curvature.HessianOperator(logsm, nll, batches(ignored)).to_dense(),
                       dense_hessian(logsm, nll, X, ignored)))
kl = nn.KLDivLoss(reduction="batchmean")
p = torch.softmax(torch.randn(7, 3, generator=g, dtype=torch.float64), 1)
report("item 3: KLDiv batchmean Hessian, 2 batches",
       lambda: rel_err(curvature.HessianOperator(logsm, kl, batches(p)).to_dense(), dense_hessian(logsm, kl, X, p)))


class Focal(nn.CrossEntropyLoss):
    def forward(self, z, y):
        logp = torch.log_softmax(z, 1).gather(1, y[:, None]).squeeze(1)
        return (-(1 - logp.exp()) ** 2 * logp).mean()


class HalfMSE(nn.MSELoss):
    def forward(self, z, y):
        return 0.5 * super().forward(z, y)


labels = torch.tensor([0, 2, 1, 1, 0, 2, 1])
target = torch.randn(7, 3, generator=g, dtype=torch.float64)
report("item 5: focal-loss subclass GGN", lambda: rel_err(
    curvature.GGNOperator(model, Focal(), (X, labels)).to_dense(), ggn_truth(model, Focal(), labels)))
report("item 5: half-MSE subclass GGN", lambda: rel_err(
    curvature.GGNOperator(model, HalfMSE(), (X, target)).to_dense(), ggn_truth(model, HalfMSE(), target)))
soft = p.clone()
soft[1] = 0.0
soft[3] *= 0.5
ce = nn.CrossEntropyLoss()
report("item 7: CE soft targets (zero row) GGN", lambda: rel_err(
    curvature.GGNOperator(model, ce, (X, soft)).to_dense(), ggn_truth(model, ce, soft)))
report("item 7: CE soft targets exact Fisher vs GGN", lambda: rel_err(
    curvature.FisherOperator(model, ce, (X, soft), kind="exact").to_dense(), ggn_truth(model, ce, soft)))
