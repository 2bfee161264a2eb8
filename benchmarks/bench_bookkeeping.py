"""Krylov / probe bookkeeping per product, with the product's own cost subtracted (issue 12).

The operator is a cheap float32 diagonal-plus-low-rank matrix of the benchmark MLP's size
(n = 269,322): its product costs a few ms, measured in the same run and subtracted, so
what is left is the estimators' own work per product (orthogonalization, projections,
restarts, probe draws, assembly).  The ratio column divides it by the cost of one
Hessian-vector product of the 784-256-256-10 MLP (N = 2048), also measured in this run.
One thread; medians of ``--repeats`` interleaved repeats.

Run:  python benchmarks/bench_bookkeeping.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import curvature
import estimators

N_PARAMS = 269_322


def cheap_operator(n: int = N_PARAMS, dtype=torch.float32):
    """Diagonal spectrum in [0, 1] plus a rank-6 spike (top eigenvalues 2.0 .. 1.5)."""
    g = torch.Generator().manual_seed(0)
    d = torch.rand(n, generator=g, dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(n, 6, generator=g, dtype=torch.float64))
    s = torch.linspace(2.0, 1.5, 6, dtype=torch.float64)
    d, U, s = d.to(dtype), U.to(dtype), s.to(dtype)

    def matmat(X):
        return d[:, None] * X + U @ (s[:, None] * (U.T @ X))

    return curvature.CallableOperator(matmat, (n, n), dtype=dtype, is_symmetric=True)


def hvp_seconds(reps: int = 5) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(2048, 784, generator=g), torch.randint(0, 10, (2048,), generator=g)
    H = curvature.HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    v = torch.randn(H.shape[0], 1, generator=g)
    H @ v
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        H @ v
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


TASKS = {
    "top_eigenvalues k=1 tol=1e-6": lambda op: estimators.top_eigenvalues(op, 1, tol=1e-6, seed=0),
    "top_eigenvalues k=5 tol=1e-6": lambda op: estimators.top_eigenvalues(op, 5, tol=1e-6, seed=0),
    "top_eigenvalues k=20 tol=1e-4": lambda op: estimators.top_eigenvalues(op, 20, tol=1e-4, seed=0),
    "lanczos 100 steps": lambda op: estimators.lanczos(op, 100, seed=0),
    "spectral_density 1 x 100": lambda op: estimators.spectral_density(op, 1, 100, seed=0),
    "hutchinson_trace 100 probes": lambda op: estimators.hutchinson_trace(op, 100, seed=0),
    "hutchpp_trace 99": lambda op: estimators.hutchpp_trace(op, 99, seed=0),
}


def product_seconds(op, k: int, reps: int = 5) -> float:
    """Median time of one product of a [n, k] block, per column."""
    X = torch.randn(op.shape[0], k, dtype=op.dtype)
    op.matmat(X)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        op.matmat(X)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) / k


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tasks", default=",".join(TASKS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    tasks = [t for t in TASKS if t in args.tasks.split(",")] if args.tasks != ",".join(TASKS) else list(TASKS)
    hvp = hvp_seconds()
    op = cheap_operator()
    times = {t: [] for t in tasks}
    prods = {}
    per1 = []
    for _ in range(args.repeats):  # interleaved repeats
        per1.append(product_seconds(op, 1))
        for t in tasks:
            op.reset_num_matvecs()
            t0 = time.perf_counter()
            r = TASKS[t](op)
            times[t].append(time.perf_counter() - t0)
            prods[t] = op.num_matvecs
            del r
    p1 = statistics.median(per1)
    print(f"n = {op.shape[0]}, float32, 1 thread; MLP HVP {hvp * 1e3:.1f} ms; cheap product {p1 * 1e3:.2f} ms/column")
    print("| task | products | total s | bookkeeping ms / product | / MLP HVP |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for t in tasks:
        tot = statistics.median(times[t])
        book = max(tot / prods[t] - p1, 0.0)
        print(f"| {t} | {prods[t]} | {tot:.2f} | {book * 1e3:.1f} | {book / hvp:.2f} |")


if __name__ == "__main__":
    main()
