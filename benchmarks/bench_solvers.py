"""Benchmark: second-order minimizers on logistic regression, to ||grad|| < 1e-8.

Same problem, same run: lazy-Hessian cubic / regularized Newton (m = d), full cubic
Newton (Nesterov-Polyak, adaptive M), gradient-regularized Newton (lazy with m = 1,
i.e. Mishchenko's method, and GNS), and ``scipy.optimize.minimize`` with
``trust-exact`` (dense Hessian, Cholesky-based trust region) and ``Newton-CG``
(Hessian-vector products).  Every method gets the closed-form logistic Hessian
(``A^T diag(s(1-s)) A / N``, O(N d^2)); scipy gets the same formulas in numpy.
Timings: ``torch.set_num_threads(1)``, median over repeats, ratios against full cubic
Newton measured in the same run.

    python benchmarks/bench_solvers.py                 # d = 200 and 1000, 3 repeats
    python benchmarks/bench_solvers.py --dims 200 --repeats 1

Writes ``benchmarks/results_solvers.md`` (``--out`` to change).
"""

from __future__ import annotations

import os

# one BLAS thread for numpy/scipy too (torch is set below), before numpy is imported
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import scipy.optimize  # noqa: E402
import scipy.special  # noqa: E402
import torch  # noqa: E402

import solvers  # noqa: E402
from solvers._oracle import dense_hessian  # noqa: E402
from solvers.problems import make_logistic_regression  # noqa: E402

GTOL = 1e-8


def scipy_problem(prob):
    A, y, l2 = prob.A.numpy(), prob.y.numpy(), prob.l2
    N = len(y)

    def fun(w):
        return np.logaddexp(0, -y * (A @ w)).mean() + 0.5 * l2 * w @ w

    def jac(w):
        return -(A.T @ (y * scipy.special.expit(-y * (A @ w)))) / N + l2 * w

    def hess(w):
        s = scipy.special.expit(A @ w)
        H = (A.T * (s * (1 - s) / N)) @ A
        H[np.diag_indices_from(H)] += l2
        return H

    def hessp(w, v):
        s = scipy.special.expit(A @ w)
        return A.T @ ((s * (1 - s) / N) * (A @ v)) + l2 * v

    return fun, jac, hess, hessp


def run_scipy(prob, method):
    fun, jac, hess, hessp = scipy_problem(prob)
    kw = {"hess": hess} if method == "trust-exact" else {"hessp": hessp}
    opts = {"gtol": GTOL} if method == "trust-exact" else {"xtol": 1e-14}
    if method == "Newton-CG":
        # Newton-CG has no gradient tolerance: stop it through a callback at ||grad|| < gtol
        class Done(Exception):
            pass

        state = {"nit": 0}

        def cb(xk):
            state["nit"] += 1
            state["x"] = xk.copy()
            if np.linalg.norm(jac(xk)) < GTOL:
                raise Done

        t0 = time.perf_counter()
        try:
            res = scipy.optimize.minimize(fun, np.zeros(prob.n), jac=jac, method=method, callback=cb,
                                          options=opts, **kw)
            x, nit, nh = res.x, res.nit, res.nhev
        except Done:
            x, nit, nh = state["x"], state["nit"], -1
        wall = time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        res = scipy.optimize.minimize(fun, np.zeros(prob.n), jac=jac, method=method, options=opts, **kw)
        wall = time.perf_counter() - t0
        x, nit, nh = res.x, res.nit, res.nhev
    return {"wall": wall, "nit": nit, "nhev": nh, "nfact": -1, "ngev": -1, "grad": float(np.linalg.norm(jac(x))),
            "message": "" if method == "trust-exact" or nh < 0 else str(res.message)}


def run_ours(prob, method, **opts):
    H = prob.curvature("hessian")
    t0 = time.perf_counter()
    res = solvers.minimize(prob.f, prob.x0, method=method, curvature=H, gtol=GTOL, maxiter=5000, **opts)
    wall = time.perf_counter() - t0
    assert res.success, (method, res.message)
    return {"wall": wall, "nit": res.nit, "nhev": res.nhev, "nfact": res.nfact, "ngev": res.ngev,
            "grad": res.grad_norm}


METHODS = {
    "lazy cubic Newton (m = d)": lambda p: run_ours(p, "lazy_cubic_newton"),
    "lazy regularized Newton (m = d)": lambda p: run_ours(p, "lazy_regularized_newton"),
    "cubic Newton (full)": lambda p: run_ours(p, "cubic_newton"),
    "regularized Newton (m = 1)": lambda p: run_ours(p, "lazy_regularized_newton", m=1),
    "GNS (exact Hessian)": lambda p: run_ours(p, "gns"),
    "scipy trust-exact": lambda p: run_scipy(p, "trust-exact"),
    "scipy Newton-CG": lambda p: run_scipy(p, "Newton-CG"),
}
BASELINE = "cubic Newton (full)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[200, 1000])
    ap.add_argument("--samples-per-dim", type=int, default=5)
    ap.add_argument("--cond", type=float, default=1e3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results_solvers.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    lines = [
        "## Solvers: lazy-Hessian / cubic / gradient-regularized Newton vs scipy (logistic regression)",
        "",
        f"Command: `python benchmarks/bench_solvers.py --dims {' '.join(map(str, args.dims))} "
        f"--repeats {args.repeats}`",
        "",
        f"Problem: `solvers.problems.make_logistic_regression(N = {args.samples_per_dim} d, d, cond = {args.cond:g}, "
        "l2 = 0, seed = 0)` (non-separable, feature covariance condition number cond), x0 = 0, "
        f"stop at ||grad|| < {GTOL:g}. All methods use the closed-form Hessian A^T diag(s(1-s)) A / N "
        "(scipy: the same formulas in numpy; Newton-CG gets Hessian-vector products). float64, "
        f"torch.set_num_threads(1), median wall time of {args.repeats} repeats; ratio = time / time of full cubic "
        f"Newton in the same run. Machine: {platform.machine()}, {os.cpu_count()} cores (shared with other jobs), "
        f"torch {torch.__version__}, scipy {scipy.__version__}, Python {sys.version.split()[0]}.",
        "",
    ]
    summary = []
    for d in args.dims:
        prob = make_logistic_regression(args.samples_per_dim * d, d, cond=args.cond, seed=0)
        # repeats interleaved across methods, so every method sees the same machine load
        runs: dict[str, list] = {name: [] for name in METHODS}
        for rep in range(args.repeats):
            for name, fn in METHODS.items():
                runs[name].append(fn(prob))
                r = runs[name][-1]
                print(f"d={d:5d} rep={rep} {name:34s} {r['wall']:8.3f}s nit={r['nit']:5d} nhev={r['nhev']:4d} "
                      f"nfact={r['nfact']:4d} |g|={r['grad']:.1e}", flush=True)
        rows = {}
        for name, rs in runs.items():
            r = dict(rs[0])
            r["wall"] = statistics.median(x["wall"] for x in rs)
            r["best"] = min(x["wall"] for x in rs)
            rows[name] = r
        base = rows[BASELINE]["wall"]
        lines += [f"### d = {d}, N = {args.samples_per_dim * d}", "",
                  "| method | median time [s] | best [s] | ratio vs full cubic (medians) | iterations | gradients | "
                  "Hessians | factorizations | final ‖g‖ |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, r in rows.items():
            fmt = lambda v: "n/a" if v < 0 else str(v)  # noqa: E731
            note = f" (stopped early: {r['message']})" if r["grad"] >= GTOL and r.get("message") else ""
            lines.append(f"| {name} | {r['wall']:.3f} | {r['best']:.3f} | {r['wall'] / base:.3f} | {r['nit']} | "
                         f"{fmt(r['ngev'])} | "
                         f"{fmt(r['nhev'])} | {fmt(r['nfact'])} | {r['grad']:.1e}{note} |")
        lazy = rows["lazy cubic Newton (m = d)"]["wall"]
        summary.append(
            f"- d = {d}: time ratios (medians) full cubic / lazy cubic (m = d) = {base / lazy:.2f}, "
            f"scipy trust-exact / lazy cubic = {rows['scipy trust-exact']['wall'] / lazy:.2f}, "
            f"scipy Newton-CG / lazy cubic = {rows['scipy Newton-CG']['wall'] / lazy:.2f}; Hessians: "
            f"{rows['lazy cubic Newton (m = d)']['nhev']} vs {rows[BASELINE]['nhev']} (full cubic) vs "
            f"{rows['scipy trust-exact']['nhev']} (trust-exact)."
        )
        lines.append("")
    # the Hessian path: closed form vs the generic autograd dense Hessian (smallest size: the
    # autograd path is slow at d = 1000, minutes on this machine)
    d = args.dims[0]
    prob = make_logistic_regression(args.samples_per_dim * d, d, cond=args.cond, seed=0)
    x = 0.01 * torch.ones(d, dtype=torch.float64)
    dense_hessian(prob.f, x)  # warm-up: torch.func's first call costs seconds
    t0 = time.perf_counter()
    Hc = prob.hessian(x)
    t_closed = time.perf_counter() - t0
    t0 = time.perf_counter()
    Ha = dense_hessian(prob.f, x)
    t_auto = time.perf_counter() - t0
    err = float((Hc - Ha).abs().max() / Hc.abs().max())
    lines += ["### Summary", "", *summary, "",
              f"Hessian path: at d = {d} the closed form takes {t_closed:.3f} s, the generic dense autograd path "
              f"(`solvers.dense_hessian`, vmapped forward-over-reverse, used by `curvature=\"dense_hessian\"` "
              f"and by the default `\"hessian\"` up to n = 500 when a dense matrix is needed) {t_auto:.2f} s "
              f"(relative difference {err:.1e}, after one warm-up call); the benchmark uses the closed form for every "
              "method.", ""]
    lines += [
        "Notes: the lazy methods take one Hessian and one eigendecomposition (at x0) and then only",
        "gradients and O(d^2) lazy steps, so their advantage grows with d (the Hessian costs O(N d^2), the",
        "eigendecomposition O(d^3)); at d = 200 scipy's trust-exact and Newton-CG (compiled numpy, few",
        "iterations) are about as fast as the fastest methods here. Full cubic Newton pays one `eigh` per iteration",
        "(the exact cubic subproblem), about twice a Cholesky-based trust-region iteration at d = 1000, and",
        "its adaptive M starts at 1, costing about 2x more iterations than trust-exact. scipy's Newton-CG",
        "stops on its own step-size criterion at ||grad|| ~ 1e-7, before the 1e-8 target (its time is to that point).",
        "",
    ]
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
