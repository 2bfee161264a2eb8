"""Benchmark: how the costs scale: product cost per example as N grows, bookkeeping per step as n grows.

1. **Per example** (``--sizes``, default N = 256 .. 16,384): the cached single-batch Hessian
   product and GGN product of the 784-256-256-10 tanh MLP (269,322 parameters,
   cross-entropy, float32), and one gradient for reference, each divided by N.  A flat
   column means no per-call overhead hides at small N and no super-linear term appears at
   large N.
2. **Per Lanczos step** (``--dims``, default n = 10k .. 1.8M): ``top_eigenvalues(k=5,
   tol=1e-6)`` on a cheap diagonal-plus-rank-6 operator of size n (the spectrum of
   ``benchmarks/bench_bookkeeping.py``), minus its products (measured in the same
   process), per product: the estimator's own work (orthogonalization, Ritz values,
   restarts), which should grow linearly in n (constant ns per parameter).

Each size runs in its own process, ``--repeats`` rounds round-robin over the sizes, medians
(min-max) over rounds; inside a process, times are medians of ``--inner`` interleaved calls.
One thread; CPU seconds of the process by default (``--clock cpu``: on the shared build
machine the wall clock includes waiting for a core, and with one thread CPU seconds are an
idle machine's wall clock), ``--clock wall`` for a quiet machine or CUDA.

Run:  python benchmarks/bench_scaling.py --repeats 5 --out benchmarks/results_scaling.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

SCRIPT = os.path.abspath(__file__)


def per_example_case(N: int, inner: int, timer) -> dict:
    import curvature

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(N, 784, generator=g), torch.randint(0, 10, (N,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    Hop = curvature.HessianOperator(model, loss_fn, (X, y))
    Gop = curvature.GGNOperator(model, loss_fn, (X, y))
    v = torch.randn(Hop.shape[0], generator=g)
    params = list(model.parameters())

    def grad():
        torch.autograd.grad(loss_fn(model(X), y), params)

    t = H.interleave({"gradient": grad, "hvp": lambda: Hop @ v, "ggn": lambda: Gop @ v}, inner, timer=timer)
    return {k: H.Stats.of(ts).median / N for k, ts in t.items()}


def cheap_operator(n: int):
    """Diagonal spectrum in [0, 1] plus a rank-6 spike (top eigenvalues 2.0 .. 1.5), float32."""
    import curvature

    g = torch.Generator().manual_seed(0)
    d = torch.rand(n, generator=g)
    U, _ = torch.linalg.qr(torch.randn(n, 6, generator=g))
    s = torch.linspace(2.0, 1.5, 6)

    def matmat(Xm):
        return d[:, None] * Xm + U @ (s[:, None] * (U.T @ Xm))

    return curvature.CallableOperator(matmat, (n, n), dtype=torch.float32, is_symmetric=True)


def bookkeeping_case(n: int, inner: int, timer) -> dict:
    import estimators

    op = cheap_operator(n)
    x = torch.randn(n, 1)

    def solve():
        op.reset_num_matvecs()
        r = estimators.top_eigenvalues(op, 5, tol=1e-6, seed=0)
        return r.num_matvecs

    products = solve()
    t = H.interleave({"solve": solve, "product": lambda: op.matmat(x)}, inner, timer=timer)
    solve_s, prod_s = H.Stats.of(t["solve"]).median, H.Stats.of(t["product"]).median
    per_step = (solve_s - products * prod_s) / products
    return {"products": products, "solve_s": solve_s, "product_s": prod_s, "per_step_s": per_step}


def run_case(case: dict) -> dict:
    H.one_thread()
    timer = H.clock(case["clock"])
    if case["kind"] == "N":
        return per_example_case(case["N"], case["inner"], timer)
    return bookkeeping_case(case["n"], case["inner"], timer)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="rounds over the sizes (one process each)")
    ap.add_argument("--inner", type=int, default=5, help="interleaved calls timed inside a process")
    ap.add_argument("--sizes", default="256,1024,4096,16384", help="batch sizes N (per-example table)")
    ap.add_argument("--dims", default="10000,50000,269322,1800000", help="operator sizes n (bookkeeping table)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--quick", action="store_true", help="N up to 4,096, n up to 269,322, 1 round")
    H.add_case_args(ap)
    args = ap.parse_args(argv)
    if H.served_case(args, run_case):
        return 0
    if args.quick:
        args.sizes, args.dims, args.repeats, args.inner = "256,1024,4096", "10000,50000,269322", 1, 3
    H.one_thread()  # the cases run with one thread; so does this process (and its machine line)
    sizes, dims = [int(s) for s in args.sizes.split(",")], [int(s) for s in args.dims.split(",")]
    cases = [{"kind": "N", "N": N, "inner": args.inner, "clock": args.clock} for N in sizes]
    cases += [{"kind": "n", "n": n, "inner": args.inner, "clock": args.clock} for n in dims]
    res = H.run_cases(SCRIPT, cases, args.repeats, timeout=1800)
    failed = [f"{json.dumps(c)}: {r['error']}" for c in cases for r in res[H.case_key(c)] if "error" in r]

    def stats(case, field, scale=1.0):
        rs = H.ok_results(res[H.case_key(case)])
        return H.Stats.of(r[field] * scale for r in rs) if rs else None

    def fmt(s, digits=1):
        return "failed" if s is None else s.fmt(digits)

    rows = []
    for c in cases[:len(sizes)]:
        g, hv, gg = (stats(c, k, 1e6) for k in ("gradient", "hvp", "ggn"))
        rows.append([f"{c['N']:,}", fmt(hv), fmt(gg), fmt(g),
                     "failed" if None in (g, hv) else f"{hv.median / g.median:.2f}x"])
    t1 = H.table(["N", "Hessian product, cached [us / example]", "GGN product, cached [us / example]",
                  "gradient [us / example]", "Hessian product / gradient"], rows,
                 title="Cost per example, MLP 784-256-256-10 (269,322 parameters)")
    rows = []
    for c in cases[len(sizes):]:
        st = stats(c, "per_step_s", 1e6)
        pr = stats(c, "product_s", 1e6)
        rs = H.ok_results(res[H.case_key(c)])
        rows.append([f"{c['n']:,}", str(rs[0]["products"]) if rs else "failed", fmt(st, 0), fmt(pr, 0),
                     "failed" if st is None else f"{st.median * 1e3 / c['n']:.2f}"])
    t2 = H.table(["n", "products", "bookkeeping per step [us]", "operator product [us]", "bookkeeping [ns / parameter]"],
                 rows, title="`top_eigenvalues(k=5, tol=1e-6)` bookkeeping per step (time minus products, per product)")
    notes = ["each size in its own process; medians (min-max) over rounds of the per-process medians; "
             f"{'CPU seconds of the process' if args.clock == 'cpu' else 'wall clock'}, one thread; the bookkeeping "
             "operator is diagonal plus rank 6, so its product is cheap and known"]
    notes += [f"failed: {f}" for f in failed]
    cmd = (f"python benchmarks/bench_scaling.py --repeats {args.repeats} --sizes {args.sizes} --dims {args.dims} "
           "--out benchmarks/results_scaling.md")
    H.write_results(args.out, "scaling", "Scaling: cost per example as N grows, bookkeeping per step as n grows",
                    cmd, [t1, t2], notes)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
