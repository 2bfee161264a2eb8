"""Lazy-Hessian Newton vs full cubic Newton vs gradient descent on logistic regression.

Synthetic, non-separable logistic regression (``solvers.problems``) with the
closed-form Hessian ``A^T diag(s(1-s)) A / N`` as the curvature factory.  Compares

* ``cubic_newton``              (a Hessian and an eigendecomposition every step),
* ``lazy_cubic_newton``  m = d  (one Hessian per d steps; lazy steps cost O(d^2)),
* ``lazy_regularized_newton`` m = d,
* ``gradient_descent``          (backtracking baseline),

and plots the gradient norm against iterations, wall time and Hessian computations.

    python examples/logistic_lazy_newton.py            # d = 500, N = 2500 (about a minute)
    python examples/logistic_lazy_newton.py --fast     # d = 60 (seconds)

Writes ``<out>/logistic_lazy_newton.png`` and prints a table.
"""

from __future__ import annotations

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import solvers  # noqa: E402
from solvers.problems import make_logistic_regression  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fast", action="store_true", help="small problem (seconds)")
    p.add_argument("--out", default="out", help="output directory for the PNG")
    p.add_argument("--dim", type=int, default=None, help="dimension d (default 500, 60 with --fast)")
    p.add_argument("--samples-per-dim", type=int, default=5, help="N = samples_per_dim * d")
    p.add_argument("--l2", type=float, default=0.0, help="ridge weight")
    p.add_argument("--cond", type=float, default=1e3, help="condition number of the feature covariance")
    p.add_argument("--gtol", type=float, default=1e-8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    d = args.dim or (60 if args.fast else 500)
    torch.set_num_threads(1)
    prob = make_logistic_regression(args.samples_per_dim * d, d, l2=args.l2, cond=args.cond, seed=args.seed)
    H = prob.curvature("hessian")
    runs = {
        "cubic Newton (full)": lambda: solvers.cubic_newton(prob.f, prob.x0, curvature=H, gtol=args.gtol),
        f"lazy cubic Newton (m = d = {d})": lambda: solvers.lazy_cubic_newton(prob.f, prob.x0, curvature=H,
                                                                             gtol=args.gtol),
        f"lazy regularized Newton (m = {d})": lambda: solvers.lazy_regularized_newton(prob.f, prob.x0, curvature=H,
                                                                                      gtol=args.gtol),
        "gradient descent": lambda: solvers.gradient_descent(prob.f, prob.x0, gtol=args.gtol,
                                                             maxiter=300 if args.fast else 1000),
    }
    results, wall = {}, {}
    for name, run in runs.items():
        t0 = time.perf_counter()
        results[name] = run()
        wall[name] = time.perf_counter() - t0

    print(f"logistic regression: d = {d}, N = {args.samples_per_dim * d}, l2 = {args.l2}, cond = {args.cond:g}, "
          f"gtol = {args.gtol:g}")
    print(f"{'method':38s} {'iters':>6s} {'grads':>6s} {'Hess':>5s} {'eigh':>5s} {'time[s]':>8s} {'|grad|':>9s}")
    for name, r in results.items():
        print(f"{name:38s} {r.nit:6d} {r.ngev:6d} {r.nhev:5d} {r.nfact:5d} {wall[name]:8.2f} {r.grad_norm:9.2e}")

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, r in results.items():
        h = r.history
        axes[0].semilogy(range(len(h)), h.grad_norm, label=name)
        axes[1].semilogy(h.time, h.grad_norm, label=name)
        if r.nhev:
            axes[2].semilogy(h.nhev, h.grad_norm, drawstyle="steps-post", label=name)
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("wall time [s]")
    axes[2].set_xlabel("Hessian computations")
    for ax in axes:
        ax.set_ylabel(r"$\|\nabla f(x_k)\|$")
        ax.axhline(args.gtol, color="gray", lw=0.8, ls=":")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_xlim(0, max(len(r.history) for n, r in results.items() if "gradient" not in n) * 1.5)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Lazy Hessians on logistic regression (d = {d})")
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "logistic_lazy_newton.png")
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
