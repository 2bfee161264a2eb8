"""Reproduce Figure 2 of Tong, Ma & Chi (JMLR 2021) and the ScaledGD(lambda) claim of Xu et al. (2023).

Panels: (1) matrix sensing, (2) matrix completion -- relative error ||L R^T - X*||_F / ||X*||_F
vs iteration for ScaledGD (eta = 0.5) and GD (eta = 0.5 / sigma_max) at kappa in {1, 5, 10, 20};
(3) overparameterized PSD sensing from a small random initialization: ScaledGD(lambda) vs GD.

Settings (``--setting``):

* ``fast`` -- seconds: sensing n = 20, r = 2; completion n = 100, r = 3, p = 0.3; the
  overparameterized panel at n = 10, r* = 2, r' = 3, m = 4000 (m > n^2: an injective,
  easy design -- a smoke test, not the paper's regime).
* ``reduced`` -- minutes: sensing n = 100, r = 10 (m = 5nr); completion as published.
* ``paper`` -- the official scripts ``MS.m`` / ``MC.m`` (github Titan-Tong/ScaledGD):
  sensing n = 200, r = 10, m = 5nr = 10 000 (a dense float64 design of 3.2 GB),
  completion n = 1000, r = 10, p = 0.2; T = 1000 iterations, eta = 0.5, GD step
  0.5 / sigma_max, the same design / mask for every kappa, stop below 1e-14 (their
  ``thresh_low``), and their truth: the scripts take ``V* = svds(U_seed)``, i.e.
  ``V* = U*`` (``right_from_left=True``; ``--truth independent`` draws V* separately).
  The overparameterized panel uses n = 100, r* = 3, r' = 5, m = 10 n r* = 3000,
  alpha = 1e-12, lambda = sigma_min(M*), eta = 0.3: Xu et al. publish no code and their
  figure parameters were not available here, so this is our reading of the paper's
  regime (m of order n r*), not a verified copy.

    python examples/scaled_gd_reproduction.py --setting fast
    python examples/scaled_gd_reproduction.py --setting paper --out docs/reproductions

Writes ``<out>/scaled_gd_reproduction.png`` and ``<out>/scaled_gd.json`` and prints the
iterations to the tolerance.  Random draws (torch generators) differ from MATLAB's, so
counts compare in size, not digit by digit.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from solvers import factored_gd, matrix_completion_problem, matrix_sensing_problem, scaled_gd

KAPPAS = (1, 5, 10, 20)

SETTINGS = {
    "fast": dict(sensing=dict(n=20, r=2), completion=dict(n=100, r=3, p=0.3), maxiter=400, tol=1e-10,
                 over=dict(n=10, r_star=2, r=3, m=4000, alpha=1e-12, lam=1.0, eta=0.3, kappas=(10, 100),
                           maxiter=400, gd_maxiter=800, tol=1e-8)),
    "reduced": dict(sensing=dict(n=100, r=10), completion=dict(n=1000, r=10, p=0.2), maxiter=1000, tol=1e-10,
                    over=dict(n=10, r_star=2, r=3, m=4000, alpha=1e-12, lam=1.0, eta=0.3, kappas=(10, 100),
                              maxiter=1000, gd_maxiter=3000, tol=1e-8)),
    "paper": dict(sensing=dict(n=200, r=10), completion=dict(n=1000, r=10, p=0.2), maxiter=1000, tol=1e-14,
                  over=dict(n=100, r_star=3, r=5, m=3000, alpha=1e-12, lam=1.0, eta=0.3, kappas=(10, 100),
                            maxiter=1000, gd_maxiter=1000, tol=1e-8)),
}


def run_tong_figure2(setting: str, truth: str = "authors", problems=("sensing", "completion")) -> dict:
    """Sensing and/or completion panels; returns curves and ``table`` rows
    ``(problem, kappa, scaledgd_its, gd_its, scaledgd_s, gd_s)`` (``None`` = not reached)."""
    cfg = SETTINGS[setting]
    rfl = truth == "authors"
    tol, maxiter = cfg["tol"], cfg["maxiter"]
    curves, table = {"sensing": {}, "completion": {}}, []
    for name in problems:
        for kappa in KAPPAS:
            if name == "sensing":
                c = cfg["sensing"]
                P = matrix_sensing_problem(c["n"], c["r"], kappa, right_from_left=rfl, seed=0)
            else:
                c = cfg["completion"]
                P = matrix_completion_problem(c["n"], c["r"], kappa, p=c["p"], right_from_left=rfl, seed=0)
            t0 = time.perf_counter()
            s = scaled_gd(P, c["r"], eta=0.5, maxiter=maxiter, tol=tol)
            t1 = time.perf_counter()
            g = factored_gd(P, c["r"], eta=0.5, maxiter=maxiter, tol=tol)
            t2 = time.perf_counter()
            curves[name][kappa] = (s.relative_errors, g.relative_errors)
            table.append((name, kappa, s.iterations_to(tol), g.iterations_to(tol), t1 - t0, t2 - t1))
            print(f"{name:11s} kappa={kappa:3d}: ScaledGD {s.iterations_to(tol)} its, GD {g.iterations_to(tol)} its "
                  f"(to {tol:g})", flush=True)
            del P
    return {"curves": curves, "table": table}


def run_overparameterized(setting: str) -> dict:
    """ScaledGD(lambda) vs GD on overparameterized PSD sensing from ``alpha * N(0, 1/n)``.

    Returns curves and rows ``(kappa, scaledgd_lambda_its, gd_its, scaledgd_lambda_final, gd_final)``."""
    c = SETTINGS[setting]["over"]
    curves, rows = {}, []
    for kappa in c["kappas"]:
        P = matrix_sensing_problem(c["n"], c["r_star"], kappa, num_measurements=c["m"], psd=True, seed=0)
        s = scaled_gd(P, c["r"], eta=c["eta"], damping=c["lam"] / kappa, init="random", init_scale=c["alpha"],
                      maxiter=c["maxiter"], tol=c["tol"])
        g = factored_gd(P, c["r"], eta=c["eta"], init="random", init_scale=c["alpha"], maxiter=c["gd_maxiter"],
                        tol=c["tol"])
        curves[kappa] = (s.relative_errors, g.relative_errors)
        rows.append((kappa, s.iterations_to(c["tol"]), g.iterations_to(c["tol"]), s.relative_errors[-1],
                     g.relative_errors[-1]))
        print(f"overparam.  kappa={kappa:3d}: ScaledGD(lambda) {rows[-1][1]} its (final {rows[-1][3]:.2e}), "
              f"GD {rows[-1][2]} its (final {rows[-1][4]:.2e}) to {c['tol']:g}", flush=True)
    return {"curves": curves, "rows": rows}


def _plot(setting: str, fig2: dict, over: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = SETTINGS[setting]
    oc = cfg["over"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = dict(zip((1, 5, 10, 20, 100), ("C0", "C1", "C2", "C3", "C4")))
    titles = {
        "sensing": f"matrix sensing n={cfg['sensing']['n']}, r={cfg['sensing']['r']}, m=5nr",
        "completion": f"matrix completion n={cfg['completion']['n']}, r={cfg['completion']['r']}, "
                      f"p={cfg['completion']['p']}",
        "overparameterized": f"PSD sensing n={oc['n']}, r*={oc['r_star']}, r'={oc['r']}, m={oc['m']}, "
                             f"alpha={oc['alpha']:g}",
    }
    panels = [("sensing", fig2["curves"]["sensing"]), ("completion", fig2["curves"]["completion"]),
              ("overparameterized", over["curves"])]
    for ax, (name, cs) in zip(axes, panels):
        if not cs:
            ax.text(0.5, 0.5, f"{name}: not run (see --problems)", ha="center", va="center", transform=ax.transAxes)
        for kappa, (s_err, g_err) in cs.items():
            lab = "ScaledGD(λ)" if name == "overparameterized" else "ScaledGD"
            ax.semilogy(s_err, color=colors[kappa], label=f"{lab} κ={kappa}")
            ax.semilogy(g_err, color=colors[kappa], ls="--", label=f"GD κ={kappa}")
        ax.set_title(titles[name], fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_ylabel("relative error")
        ax.set_ylim(1e-15 if name != "overparameterized" else 1e-10, 10)
        ax.grid(alpha=0.3, which="both")
        if cs:
            ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=tuple(SETTINGS), default="reduced")
    ap.add_argument("--fast", action="store_true", help="same as --setting fast")
    ap.add_argument("--paper", action="store_true", help="same as --setting paper")
    ap.add_argument("--truth", choices=("authors", "independent"), default=None,
                    help="authors: V* = U* as in MS.m/MC.m (default for --setting paper); independent: V* drawn "
                         "separately (default otherwise)")
    ap.add_argument("--problems", default="sensing,completion,overparameterized",
                    help="comma-separated panels to run (default all three); the JSON holds the ones run")
    ap.add_argument("--out", default="out")
    args = ap.parse_args(argv)
    problems = tuple(p for p in args.problems.split(",") if p)
    bad = set(problems) - {"sensing", "completion", "overparameterized"}
    if bad:
        ap.error(f"unknown panel(s) {sorted(bad)}; choose from sensing, completion, overparameterized")
    setting = "fast" if args.fast else "paper" if args.paper else args.setting
    truth = args.truth or ("authors" if setting == "paper" else "independent")
    torch.set_num_threads(1)
    fig2 = run_tong_figure2(setting, truth, tuple(p for p in problems if p != "overparameterized"))
    over = run_overparameterized(setting) if "overparameterized" in problems else {"curves": {}, "rows": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _plot(setting, fig2, over, out / "scaled_gd_reproduction.png")
    cfg = SETTINGS[setting]
    tol = cfg["tol"]
    print(f"\n{'problem':11s} {'kappa':>5s} {'ScaledGD its':>13s} {'GD its':>8s} {'ScaledGD s':>11s} {'GD s':>7s}"
          f"  (to {tol:g}, <= {cfg['maxiter']})")
    for name, kappa, a, b, ta, tb in fig2["table"]:
        print(f"{name:11s} {kappa:5d} {str(a):>13s} {str(b) if b is not None else '>' + str(cfg['maxiter']):>8s} "
              f"{ta:11.2f} {tb:7.2f}")
    print(f"\n{'overparam.':11s} {'kappa':>5s} {'ScaledGD(λ)':>12s} {'GD':>8s} {'final S(λ)':>11s} {'final GD':>9s}"
          f"  (to {cfg['over']['tol']:g})")
    for kappa, a, b, ea, eb in over["rows"]:
        print(f"{'PSD':11s} {kappa:5d} {str(a):>12s} {str(b):>8s} {ea:11.2e} {eb:9.2e}")
    result = {"setting": setting, "truth": truth, "problems": list(problems), "config": {k: v for k, v in cfg.items()},
              "table": fig2["table"], "overparameterized": over["rows"]}
    with open(out / "scaled_gd.json", "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out / 'scaled_gd_reproduction.png'} and {out / 'scaled_gd.json'}")
    return result


if __name__ == "__main__":
    main()
