"""Krylov / probe bookkeeping per product, before and after (issue 12), and the MLP targets.

Part 1 (bookkeeping).  The operator is a cheap float32 diagonal-plus-low-rank matrix of
the benchmark MLP's size (n = 269,322): its product costs a few ms, measured in the same
run and subtracted, so what is left is the estimators' own work per product
(orthogonalization, projections, restarts, probe draws, assembly).  The ratio columns
divide it by the cost of one Hessian-vector product of the 784-256-256-10 MLP (N = 2048),
also measured in this run.  "before" is the ``estimators`` package of ``--before`` (a git
revision, default the commit before this work), loaded from git into a temporary
directory and run in the same process, interleaved with the current code.

Part 2 (``--mlp``, on by default).  The MLP's cached Hessian itself, float32: ours at
tol 1e-6 against ``scipy.sparse.linalg.eigsh`` (ARPACK) on ``op.to_scipy()`` at tol 1e-3,
top-5 and top-1 (products and time), a warm start (``v0`` = the top-5 eigenvectors of the
model before one SGD step) and a block start (``block_size=5``); SLQ 1 probe x 100 steps
against PyHessian's ``density(iter=100, n_v=1)``.

One thread; CPU time (``time.process_time``) of this process, medians of ``--repeats``
interleaved repeats (the machine is shared; CPU time does not count other jobs' turns).

Run:  python benchmarks/bench_bookkeeping.py --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

import curvature
import estimators

N_PARAMS = 269_322
CLOCK = time.process_time
BEFORE = "04f6c22"  # the commit before issue 12 items 1-2


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


def make_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(2048, 784, generator=g), torch.randint(0, 10, (2048,), generator=g)
    return model, X, y


def hvp_seconds(reps: int = 5) -> float:
    model, X, y = make_mlp()
    H = curvature.HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    v = torch.randn(H.shape[0], 1, generator=torch.Generator().manual_seed(1))
    H @ v
    ts = []
    for _ in range(reps):
        t = CLOCK()
        H @ v
        ts.append(CLOCK() - t)
    return statistics.median(ts)


def load_before(rev: str):
    """The ``estimators`` package at git revision ``rev``, imported as ``estimators_before``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tmp = tempfile.mkdtemp(prefix="estimators_before_")
    tar = subprocess.run(["git", "-C", root, "archive", rev, "estimators"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", tmp], input=tar, check=True)
    os.rename(os.path.join(tmp, "estimators"), os.path.join(tmp, "estimators_before"))
    sys.path.insert(0, tmp)
    return importlib.import_module("estimators_before")


TASKS = {
    "top_eigenvalues k=1 tol=1e-6": lambda E, op: E.top_eigenvalues(op, 1, tol=1e-6, seed=0),
    "top_eigenvalues k=5 tol=1e-6": lambda E, op: E.top_eigenvalues(op, 5, tol=1e-6, seed=0),
    "top_eigenvalues k=20 tol=1e-4": lambda E, op: E.top_eigenvalues(op, 20, tol=1e-4, seed=0),
    "lanczos 100 steps": lambda E, op: E.lanczos(op, 100, seed=0),
    "spectral_density 1 x 100": lambda E, op: E.spectral_density(op, 1, 100, seed=0),
    "hutchinson_trace 100 probes": lambda E, op: E.hutchinson_trace(op, 100, seed=0),
    "hutchpp_trace 99": lambda E, op: E.hutchpp_trace(op, 99, seed=0),
}
# options the code before did not have: run on the current code only
NEW_TASKS = {
    "top_eigenvalues k=5 tol=1e-6 basis_dtype=float32":
        lambda E, op: E.top_eigenvalues(op, 5, tol=1e-6, seed=0, basis_dtype=torch.float32),
    "top_eigenvalues k=20 tol=1e-4 basis_dtype=float32":
        lambda E, op: E.top_eigenvalues(op, 20, tol=1e-4, seed=0, basis_dtype=torch.float32),
}


def product_seconds(op, k: int, reps: int = 5) -> float:
    """Median time of one product of a [n, k] block, per column."""
    X = torch.randn(op.shape[0], k, dtype=op.dtype)
    op.matmat(X)
    ts = []
    for _ in range(reps):
        t = CLOCK()
        op.matmat(X)
        ts.append(CLOCK() - t)
    return statistics.median(ts) / k


def bookkeeping(repeats: int, before_rev: str | None, names: list[str]) -> None:
    hvp = hvp_seconds()
    op = cheap_operator()
    impls = {"after": estimators}
    if before_rev:
        impls["before"] = load_before(before_rev)
    runs = [(t, "after", TASKS.get(t) or NEW_TASKS[t]) for t in names]
    runs += [(t, "before", TASKS[t]) for t in names if t in TASKS and "before" in impls]
    times = {(t, v): [] for t, v, _ in runs}
    prods = {}
    per1 = []
    for _ in range(repeats):  # interleaved repeats
        per1.append(product_seconds(op, 1))
        for t, v, fn in runs:
            op.reset_num_matvecs()
            with warnings.catch_warnings():
                # tol 1e-6 is below this float32 operator's measured rounding: the
                # eigen tasks stop at the rounding floor and warn (same work either way)
                warnings.simplefilter("ignore")
                t0 = CLOCK()
                r = fn(impls[v], op)
                times[t, v].append(CLOCK() - t0)
            prods[t, v] = op.num_matvecs
            del r
    p1 = statistics.median(per1)

    def book(t, v):
        return max(statistics.median(times[t, v]) / prods[t, v] - p1, 0.0)

    print(f"n = {op.shape[0]}, float32, 1 thread; MLP HVP {hvp * 1e3:.1f} ms; cheap product {p1 * 1e3:.2f} ms/column"
          + (f"; before = {before_rev}" if before_rev else ""))
    print("| task | products before / after | bookkeeping ms / product before / after | / MLP HVP before | "
          "/ MLP HVP after |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for t in names:
        if (t, "before") in times:
            print(f"| {t} | {prods[t, 'before']} / {prods[t, 'after']} | {book(t, 'before') * 1e3:.1f} / "
                  f"{book(t, 'after') * 1e3:.1f} | {book(t, 'before') / hvp:.2f} | **{book(t, 'after') / hvp:.2f}** |")
        else:
            print(f"| {t} | - / {prods[t, 'after']} | - / {book(t, 'after') * 1e3:.1f} | - | "
                  f"**{book(t, 'after') / hvp:.2f}** |")


def mlp_targets(repeats: int) -> None:
    """Products and time on the MLP's cached float32 Hessian: ours vs ARPACK and PyHessian."""
    from scipy.sparse.linalg import eigsh

    model, X, y = make_mlp()
    loss_fn = nn.CrossEntropyLoss()
    op = curvature.HessianOperator(model, loss_fn, (X, y))
    # the model one SGD step earlier, for the warm start
    prev = copy.deepcopy(model)
    loss = loss_fn(prev(X), y)
    grads = torch.autograd.grad(loss, list(prev.parameters()))
    with torch.no_grad():
        for p, g in zip(prev.parameters(), grads):
            p.add_(g, alpha=1e-2)  # the previous iterate: this model is one lr=1e-2 step from it
    prev_op = curvature.HessianOperator(prev, loss_fn, (X, y))
    v_prev = estimators.top_eigenvalues(prev_op, 5, tol=1e-6, seed=1).eigenvectors

    def ours(k, **kw):
        def run():
            before = op.num_matvecs
            estimators.top_eigenvalues(op, k, tol=1e-6, seed=0, **kw)
            return op.num_matvecs - before
        return run

    def arpack(k):
        def run():
            before = op.num_matvecs
            eigsh(op.to_scipy(), k=k, which="LA", tol=1e-3, return_eigenvectors=False)
            return op.num_matvecs - before
        return run

    def slq():
        before = op.num_matvecs
        estimators.spectral_density(op, 1, 100, seed=0)
        return op.num_matvecs - before

    def pyhessian_density():
        from bench_estimators import pyhessian_setup

        H, c = pyhessian_setup(model, X, y)
        H.density(iter=100, n_v=1)
        return c.n

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    cases = {
        "ours top-5 tol=1e-6": ours(5),
        "ARPACK eigsh top-5 tol=1e-3": arpack(5),
        "ours top-1 tol=1e-6": ours(1),
        "ARPACK eigsh top-1 tol=1e-3": arpack(1),
        "ours top-5 tol=1e-6 criterion='eigenvalue'": ours(5, criterion="eigenvalue"),
        "ours top-1 tol=1e-6 criterion='eigenvalue'": ours(1, criterion="eigenvalue"),
        "ours top-5 tol=1e-6 warm (v0 = top-5 one SGD step earlier)": ours(5, v0=v_prev),
        "ours top-5 tol=1e-6 block_size=5": ours(5, block_size=5),
        "ours top-5 tol=1e-6 basis_dtype=float32": ours(5, basis_dtype=torch.float32),
        "ours spectral_density 1 x 100": slq,
        "PyHessian density(iter=100, n_v=1)": pyhessian_density,
    }
    times = {c: [] for c in cases}
    prods = {}
    op @ torch.randn(op.shape[0], 1)  # build the cached graph
    for _ in range(repeats):
        for c, fn in cases.items():
            t0 = CLOCK()
            prods[c] = fn()
            times[c].append(CLOCK() - t0)
    med = {c: statistics.median(v) for c, v in times.items()}
    print(f"\nMLP 784-256-256-10 tanh, n = {op.shape[0]}, N = 2048, float32 cached Hessian, 1 thread")
    print("| case | products | CPU s | ratio |")
    print("| --- | ---: | ---: | --- |")
    base = {"ours top-5 tol=1e-6": "ARPACK eigsh top-5 tol=1e-3", "ours top-1 tol=1e-6": "ARPACK eigsh top-1 tol=1e-3",
            "ours spectral_density 1 x 100": "PyHessian density(iter=100, n_v=1)"}
    for c in cases:
        ratio = f"{med[c] / med[base[c]]:.2f}x the time of {base[c]}" if c in base else ""
        print(f"| {c} | {prods[c]} | {med[c]:.2f} | {ratio} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tasks", default=",".join(list(TASKS) + list(NEW_TASKS)))
    ap.add_argument("--before", default=BEFORE, help="git revision for the 'before' column ('none' to skip)")
    ap.add_argument("--no-mlp", action="store_true", help="skip part 2 (the MLP Hessian)")
    ap.add_argument("--no-bookkeeping", action="store_true", help="skip part 1 (the cheap operator)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = [t for t in list(TASKS) + list(NEW_TASKS) if t in args.tasks.split(",")]
    if not args.no_bookkeeping:
        bookkeeping(args.repeats, None if args.before == "none" else args.before, names)
    if not args.no_mlp:
        mlp_targets(args.repeats)


if __name__ == "__main__":
    main()
