"""Per-product overhead of the operator loop vs plain torch, and the data-fingerprint cost.

Run from the worktree root:  python benchmarks/bench_dataloop.py
Interleaved repeats, medians; ratios against plain torch measured in the same run.
"""
import statistics
import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # this worktree's packages
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvature import HessianOperator

torch.set_num_threads(1)
torch.manual_seed(0)


def timed(fn, reps):
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main():
    model = nn.Sequential(nn.Linear(20, 50), nn.Tanh(), nn.Linear(50, 30), nn.Tanh(), nn.Linear(30, 10)).double()
    n = sum(p.numel() for p in model.parameters())
    X, y = torch.randn(64, 20, dtype=torch.float64), torch.randint(0, 10, (64,))
    loss_fn = nn.CrossEntropyLoss()
    v = torch.randn(n, dtype=torch.float64)
    params = list(model.parameters())
    g = torch.autograd.grad(loss_fn(model(X), y), params, create_graph=True)
    vs = [t.reshape(p.shape) for t, p in zip(v.split([p.numel() for p in params]), params)]

    def plain():
        hv = torch.autograd.grad(g, params, vs, retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv])

    H = HessianOperator(model, loss_fn, (X, y))
    Hv = HessianOperator(model, loss_fn, (X, y), cache_check="version")
    H @ v
    Hv @ v
    loader = DataLoader(TensorDataset(X.float().double(), y), batch_size=16)
    Hl = HessianOperator(model, loss_fn, loader)
    Hl_nocheck = HessianOperator(model, loss_fn, loader, check_data=False)
    res = {"plain": [], "op": [], "op_version": [], "loader": [], "loader_nocheck": []}
    for _ in range(21):
        res["plain"].append(timed(plain, 100))
        res["op"].append(timed(lambda: H @ v, 100))
        res["op_version"].append(timed(lambda: Hv @ v, 100))
        res["loader"].append(timed(lambda: Hl @ v, 5))
        res["loader_nocheck"].append(timed(lambda: Hl_nocheck @ v, 5))
    med = {k: statistics.median(t) for k, t in res.items()}
    print(f"n = {n} parameters, single batch of 64 (cached HVP)")
    print(f"plain torch HVP       {med['plain'] * 1e3:.3f} ms")
    for k in ("op", "op_version"):
        print(f"{k:20s}  {med[k] * 1e3:.3f} ms  ratio {med[k] / med['plain']:.2f}  overhead "
              f"{(med[k] - med['plain']) * 1e3:.3f} ms")
    print(f"loader (4 batches)    {med['loader'] * 1e3:.3f} ms; check_data=False {med['loader_nocheck'] * 1e3:.3f} ms;"
          f" fingerprint+RNG share {(med['loader'] - med['loader_nocheck']) / med['loader_nocheck'] * 100:.1f}%")


if __name__ == "__main__":
    main()
