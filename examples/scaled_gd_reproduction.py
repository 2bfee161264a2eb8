"""Reproduce Figure 2 of Tong, Ma & Chi (JMLR 2021) and the ScaledGD(lambda) claim of Xu et al. (2023).

Panels: (1) matrix sensing, (2) matrix completion -- relative error ||L R^T - X*||_F / ||X*||_F
vs iteration for ScaledGD (eta = 0.5) and GD (eta = 0.5 / sigma_max) at kappa in {1, 5, 10, 20};
(3) overparameterized PSD sensing (r = 2, r' = 3) from a small random initialization:
ScaledGD(lambda) vs GD at kappa in {10, 100}.

    python examples/scaled_gd_reproduction.py --fast     # seconds (small sizes)
    python examples/scaled_gd_reproduction.py            # sensing n=100 (m=5nr), completion n=1000
    python examples/scaled_gd_reproduction.py --paper    # sensing n=200 as published (3.2 GB design, slow)

Writes ``<out>/scaled_gd_reproduction.png`` and prints iterations to 1e-10 (1e-8 for panel 3).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from solvers import factored_gd, matrix_completion_problem, matrix_sensing_problem, scaled_gd


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--paper", action="store_true", help="sensing at the published n = 200")
    ap.add_argument("--maxiter", type=int, default=None)
    ap.add_argument("--out", default="out")
    args = ap.parse_args(argv)
    torch.set_num_threads(1 if args.fast else 2)
    if args.fast:
        sens = dict(n=20, r=2)
        comp = dict(n=100, r=3, p=0.3)
        maxiter = args.maxiter or 400
    else:
        sens = dict(n=200 if args.paper else 100, r=10)
        comp = dict(n=1000, r=10, p=0.2)
        maxiter = args.maxiter or 1000
    kappas = (1, 5, 10, 20)
    tol = 1e-10
    curves, table = {"sensing": {}, "completion": {}, "overparameterized": {}}, []
    for name in ("sensing", "completion"):
        for kappa in kappas:
            if name == "sensing":
                P = matrix_sensing_problem(sens["n"], sens["r"], kappa, seed=0)
                rank = sens["r"]
            else:
                P = matrix_completion_problem(comp["n"], comp["r"], kappa, p=comp["p"], seed=0)
                rank = comp["r"]
            t0 = time.perf_counter()
            s = scaled_gd(P, rank, eta=0.5, maxiter=maxiter, tol=tol)
            t1 = time.perf_counter()
            g = factored_gd(P, rank, eta=0.5, maxiter=maxiter, tol=tol)
            t2 = time.perf_counter()
            curves[name][kappa] = (s.relative_errors, g.relative_errors)
            table.append((name, kappa, s.iterations_to(tol), g.iterations_to(tol), t1 - t0, t2 - t1))
            print(f"{name:11s} kappa={kappa:3d}: ScaledGD {s.iterations_to(tol)} its, GD {g.iterations_to(tol)} its",
                  flush=True)
    over = []
    for kappa in (10, 100):
        P = matrix_sensing_problem(10, 2, kappa, num_measurements=4000, psd=True, seed=0)
        s = scaled_gd(P, 3, eta=0.3, damping=1.0 / kappa, init="random", init_scale=1e-12,
                      maxiter=400 if args.fast else 1000, tol=1e-8)
        g = factored_gd(P, 3, eta=0.3, init="random", init_scale=1e-12, maxiter=800 if args.fast else 3000, tol=1e-8)
        curves["overparameterized"][kappa] = (s.relative_errors, g.relative_errors)
        over.append((kappa, s.iterations_to(1e-8), g.iterations_to(1e-8), g.relative_errors[-1]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = dict(zip((1, 5, 10, 20, 100), ("C0", "C1", "C2", "C3", "C4")))
    titles = {"sensing": f"matrix sensing n={sens['n']}, r={sens['r']}, m=5nr",
              "completion": f"matrix completion n={comp['n']}, r={comp['r']}, p={comp['p']}",
              "overparameterized": "PSD sensing n=10, r=2, r'=3, m=4000, alpha=1e-12"}
    for ax, (name, cs) in zip(axes, curves.items()):
        for kappa, (s_err, g_err) in cs.items():
            lab = "ScaledGD(λ)" if name == "overparameterized" else "ScaledGD"
            ax.semilogy(s_err, color=colors[kappa], label=f"{lab} κ={kappa}")
            ax.semilogy(g_err, color=colors[kappa], ls="--", label=f"GD κ={kappa}")
        ax.set_title(titles[name], fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_ylabel("relative error")
        ax.set_ylim(1e-15 if name != "overparameterized" else 1e-10, 10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "scaled_gd_reproduction.png", dpi=120)
    print(f"\n{'problem':11s} {'kappa':>5s} {'ScaledGD its':>13s} {'GD its':>8s} {'ScaledGD s':>11s} {'GD s':>7s}  (to 1e-10)")
    for name, kappa, a, b, ta, tb in table:
        print(f"{name:11s} {kappa:5d} {str(a):>13s} {str(b) if b is not None else '>' + str(maxiter):>8s} "
              f"{ta:11.2f} {tb:7.2f}")
    print(f"\n{'overparam.':11s} {'kappa':>5s} {'ScaledGD(λ)':>12s} {'GD':>8s} {'GD final err':>13s}  (to 1e-8)")
    for kappa, a, b, e in over:
        print(f"{'PSD r=2/3':11s} {kappa:5d} {str(a):>12s} {str(b):>8s} {e:13.2e}")
    print(f"wrote {out / 'scaled_gd_reproduction.png'}")
    return {"table": table, "overparameterized": over}


if __name__ == "__main__":
    main()
