"""Per-product overhead, this branch vs the base commit, in one process (interleaved, medians).

Setup:  git archive 79e2a19 | tar -x -C /tmp/dataloop_base
        cp -r /tmp/dataloop_base/curvature /tmp/dataloop_basepkg/curvature_base
Run from the worktree root:  python benchmarks/bench_overhead_ab.py
"""
import statistics
import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # this worktree's packages
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, "/tmp/dataloop_basepkg")
import curvature  # noqa: E402

assert curvature.__file__.startswith(str(_Path(__file__).resolve().parents[1]))
import curvature_base  # noqa: E402

torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(20, 50), nn.Tanh(), nn.Linear(50, 30), nn.Tanh(), nn.Linear(30, 10)).double()
n = sum(p.numel() for p in model.parameters())
X, y = torch.randn(64, 20, dtype=torch.float64), torch.randint(0, 10, (64,))
loss_fn = nn.CrossEntropyLoss()
v = torch.randn(n, dtype=torch.float64)
params = list(model.parameters())
g = torch.autograd.grad(loss_fn(model(X), y), params, create_graph=True)
vs = [t.reshape(p.shape) for t, p in zip(v.split([p.numel() for p in params]), params)]


def plain():
    return torch.cat([h.reshape(-1) for h in torch.autograd.grad(g, params, vs, retain_graph=True)])


cases = {"plain": plain}
for tag, pkg in (("new", curvature), ("base", curvature_base)):
    for check in ("checksum", "version"):
        op = pkg.HessianOperator(model, loss_fn, (X, y), cache_check=check)
        op @ v
        cases[f"{tag} {check}"] = (lambda op=op: op @ v)
    loader = DataLoader(TensorDataset(X, y), batch_size=16)
    for check in (True, False):
        op = pkg.HessianOperator(model, loss_fn, loader, check_data=check)
        cases[f"{tag} loader check_data={check}"] = (lambda op=op: op @ v)
res = {k: [] for k in cases}
for _ in range(25):
    for k, fn in cases.items():
        reps = 3 if "loader" in k else 40
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        res[k].append((time.perf_counter() - t0) / reps)
med = {k: statistics.median(t) for k, t in res.items()}
print(f"n = {n}; single batch of 64, cached HVP; loader: 4 batches of 16 (uncached)")
for k, t in med.items():
    extra = "" if "loader" in k else f"  ratio to plain {t / med['plain']:.2f}  overhead {(t - med['plain']) * 1e3:.3f} ms"
    print(f"{k:32s} {t * 1e3:8.3f} ms{extra}")
for tag in ("new", "base"):
    a, b = med[f"{tag} loader check_data=True"], med[f"{tag} loader check_data=False"]
    print(f"{tag}: data check share of a 4-batch product pass {(a - b) / b * 100:.1f}%")

# the per-batch cost of the data check and of the private RNG, against the per-batch product cost
from curvature._empirical_risk import _PrivateRNG, _fingerprint  # noqa: E402
from curvature.batches import ModelInputs  # noqa: E402

Xb, yb = X[:16], y[:16]
inputs = ModelInputs((Xb,), {}, 16)
rng = _PrivateRNG(torch.device("cpu"))
it = {"fingerprint": lambda: _fingerprint(inputs, yb, torch.device("cpu")), "private RNG": lambda: rng.call(lambda: 0)}
per = {k: [] for k in it}
for _ in range(25):
    for k, fn in it.items():
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        per[k].append((time.perf_counter() - t0) / 200)
batch_product = med["new loader check_data=False"] / 4
for k, t in per.items():
    print(f"{k} per batch: {statistics.median(t) * 1e6:.1f} us = "
          f"{statistics.median(t) / batch_product * 100:.2f}% of a one-batch product (uncached, batch of 16)")
