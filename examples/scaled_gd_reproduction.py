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
  sensing n = 200, r = 10, m = 5nr = 10 000 (a dense float64 design of 3.2 GB, drawn once
  for all kappas; the eight runs advance in lockstep, one pair of products per iteration),
  completion n = 1000, r = 10, p = 0.2; T = 1000 iterations, eta = 0.5, GD step
  0.5 / sigma_max, the same design / mask for every kappa, stop below 1e-14 (their
  ``thresh_low``), and their truth: the scripts take ``V* = svds(U_seed)``, i.e.
  ``V* = U*`` (``right_from_left=True``; ``--truth independent`` draws V* separately).
  The overparameterized panel uses n = 100, r* = 3, r' = 5, m = 40 n r* = 12 000,
  alpha = 1e-12, lambda = sigma_min(M*), eta = 0.3: Xu et al. publish no code and their
  figure parameters were not available here, so this is our setting, not a verified copy.
  At m = 10 n r* (our earlier choice) ScaledGD(lambda) stalls at kappa = 100; ``--stall-study``
  measures why (the m x lambda study in REPRODUCTIONS.md).

    python examples/scaled_gd_reproduction.py --setting fast
    python examples/scaled_gd_reproduction.py --setting paper --out docs/reproductions
    python examples/scaled_gd_reproduction.py --setting paper --problems sensing --merge --out docs/reproductions
    python examples/scaled_gd_reproduction.py --setting paper --stall-study --out docs/reproductions

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

from solvers import (
    factored_gd, matrix_completion_problem, matrix_sensing_family, matrix_sensing_problem, scaled_gd,
    scaled_gd_lockstep,
)

KAPPAS = (1, 5, 10, 20)

SETTINGS = {
    "fast": dict(sensing=dict(n=20, r=2), completion=dict(n=100, r=3, p=0.3), maxiter=400, tol=1e-10,
                 over=dict(n=10, r_star=2, r=3, m=4000, alpha=1e-12, lam=1.0, eta=0.3, kappas=(10, 100),
                           maxiter=400, gd_maxiter=800, tol=1e-8)),
    "reduced": dict(sensing=dict(n=100, r=10), completion=dict(n=1000, r=10, p=0.2), maxiter=1000, tol=1e-10,
                    over=dict(n=10, r_star=2, r=3, m=4000, alpha=1e-12, lam=1.0, eta=0.3, kappas=(10, 100),
                              maxiter=1000, gd_maxiter=3000, tol=1e-8)),
    "paper": dict(sensing=dict(n=200, r=10), completion=dict(n=1000, r=10, p=0.2), maxiter=1000, tol=1e-14,
                  over=dict(n=100, r_star=3, r=5, m=12000, alpha=1e-12, lam=1.0, eta=0.3, kappas=(10, 100),
                            maxiter=1000, gd_maxiter=1000, tol=1e-8)),
}


def run_tong_figure2(setting: str, truth: str = "authors", problems=("sensing", "completion")) -> dict:
    """Sensing and/or completion panels; returns curves and ``table`` rows
    ``(problem, kappa, scaledgd_its, gd_its, scaledgd_s, gd_s)`` (``None`` = not reached;
    sensing times are ``None``: its eight runs share one design and run in lockstep,
    their common wall time is ``wall_s["sensing"]``)."""
    cfg = SETTINGS[setting]
    rfl = truth == "authors"
    tol, maxiter = cfg["tol"], cfg["maxiter"]
    curves, table, wall = {"sensing": {}, "completion": {}}, [], {}
    if "sensing" in problems:
        # the Gaussian design does not depend on kappa: draw it once (m x n^2 float64, 3.2 GB at
        # the paper's n = 200) and advance ScaledGD and GD for every kappa together, so each
        # iteration reads it twice for all eight runs (scaled_gd_lockstep)
        c = cfg["sensing"]
        t0 = time.perf_counter()
        fam = matrix_sensing_family(c["n"], c["r"], KAPPAS, right_from_left=rfl, seed=0)
        runs = [dict(problem=i, eta=0.5, maxiter=maxiter, tol=tol, preconditioned=pre)
                for i in range(len(KAPPAS)) for pre in (True, False)]
        res = scaled_gd_lockstep(fam, c["r"], runs)
        wall["sensing"] = time.perf_counter() - t0
        for i, kappa in enumerate(KAPPAS):
            s, g = res[2 * i], res[2 * i + 1]
            curves["sensing"][kappa] = (s.relative_errors, g.relative_errors)
            table.append(("sensing", kappa, s.iterations_to(tol), g.iterations_to(tol), None, None))
            print(f"sensing     kappa={kappa:3d}: ScaledGD {s.iterations_to(tol)} its, GD {g.iterations_to(tol)} its "
                  f"(to {tol:g})", flush=True)
        print(f"sensing: 8 runs in lockstep, {wall['sensing']:.0f} s", flush=True)
        del fam, res
    if "completion" in problems:
        c = cfg["completion"]
        for kappa in KAPPAS:
            P = matrix_completion_problem(c["n"], c["r"], kappa, p=c["p"], right_from_left=rfl, seed=0)
            t0 = time.perf_counter()
            s = scaled_gd(P, c["r"], eta=0.5, maxiter=maxiter, tol=tol)
            t1 = time.perf_counter()
            g = factored_gd(P, c["r"], eta=0.5, maxiter=maxiter, tol=tol)
            t2 = time.perf_counter()
            curves["completion"][kappa] = (s.relative_errors, g.relative_errors)
            table.append(("completion", kappa, s.iterations_to(tol), g.iterations_to(tol), t1 - t0, t2 - t1))
            print(f"completion  kappa={kappa:3d}: ScaledGD {s.iterations_to(tol)} its, GD {g.iterations_to(tol)} its "
                  f"(to {tol:g})", flush=True)
    return {"curves": curves, "table": table, "wall_s": wall}


def run_overparameterized(setting: str) -> dict:
    """ScaledGD(lambda) vs GD on overparameterized PSD sensing from ``alpha * N(0, 1/n)``; the
    four runs (two kappas, two methods) share one design and run in lockstep.

    Returns curves and rows ``(kappa, scaledgd_lambda_its, gd_its, scaledgd_lambda_final, gd_final)``."""
    c = SETTINGS[setting]["over"]
    kappas = tuple(c["kappas"])
    fam = matrix_sensing_family(c["n"], c["r_star"], kappas, num_measurements=c["m"], psd=True, seed=0)
    runs = []
    for i, kappa in enumerate(kappas):
        runs.append(dict(problem=i, eta=c["eta"], damping=c["lam"] / kappa, init="random", init_scale=c["alpha"],
                         maxiter=c["maxiter"], tol=c["tol"]))
        runs.append(dict(problem=i, eta=c["eta"], init="random", init_scale=c["alpha"], maxiter=c["gd_maxiter"],
                         tol=c["tol"], preconditioned=False))
    res = scaled_gd_lockstep(fam, c["r"], runs)
    curves, rows = {}, []
    for i, kappa in enumerate(kappas):
        s, g = res[2 * i], res[2 * i + 1]
        curves[kappa] = (s.relative_errors, g.relative_errors)
        rows.append((kappa, s.iterations_to(c["tol"]), g.iterations_to(c["tol"]), s.relative_errors[-1],
                     g.relative_errors[-1]))
        print(f"overparam.  kappa={kappa:3d}: ScaledGD(lambda) {rows[-1][1]} its (final {rows[-1][3]:.2e}), "
              f"GD {rows[-1][2]} its (final {rows[-1][4]:.2e}) to {c['tol']:g}", flush=True)
    return {"curves": curves, "rows": rows}


#: the kappa = 100 stall study: measurement counts and damping factors lambda / sigma_min(M*)
STALL = {
    "fast": dict(n=20, r_star=2, r=3, kappa=100, ms=(300, 1200), lams=(1.0, 0.1), alpha=1e-12, eta=0.3,
                 maxiter=600, tol=1e-8),
    "paper": dict(n=100, r_star=3, r=5, kappa=100, ms=(3000, 6000, 12000), lams=(1.0, 0.1, 0.01), alpha=1e-12,
                  eta=0.3, maxiter=1000, tol=1e-8),
}


def stall_diagnostics(problem, Y: torch.Tensor, r_star: int) -> dict:
    """Where the error of ``X = Y Y^T`` lives, and how noisy the back-projection is.

    Returns the eigenvalues of ``Y^T Y`` (descending; beyond ``r_star`` they are the
    overparameterized directions, ``~alpha^2`` if those never grew), the relative error split
    into the parts in / across / outside the range of ``M*`` (``P E P``, ``P E Q``, ``Q E Q``,
    Frobenius, over ``||M*||_F``), and the spectral norm of the back-projection
    ``A*(y) = A*A(M*)`` outside that range, next to ``sigma_min(M*)``: spurious directions grow
    during the small-initialization phase as fast as the smallest signal direction when
    ``||Q A*(y) Q|| >~ sigma_min`` (a RIP constant too large for ``kappa``)."""
    M = problem.X_star
    n = M.shape[0]
    evals, evecs = torch.linalg.eigh(M)
    U = evecs[:, -r_star:]
    Pu = U @ U.T
    Q = torch.eye(n, dtype=M.dtype, device=M.device) - Pu
    E = Y @ Y.T - M
    nm = float(torch.linalg.matrix_norm(M))
    back = problem.spectral_matrix()
    back = 0.5 * (back + back.T)
    fro = lambda T: float(torch.linalg.matrix_norm(T)) / nm  # noqa: E731
    return {"gram_eigenvalues": [float(v) for v in torch.linalg.eigvalsh(Y.T @ Y).flip(0)],
            "error_in": fro(Pu @ E @ Pu), "error_cross": fro(Pu @ E @ Q), "error_out": fro(Q @ E @ Q),
            "backprojection_out_norm": float(torch.linalg.matrix_norm(Q @ back @ Q, ord=2)),
            "sigma_min": float(evals[-r_star])}


def run_stall_study(setting: str) -> dict:
    """ScaledGD(lambda) at kappa = 100 for each measurement count ``m`` and damping
    ``lambda = c * sigma_min``: iterations to ``tol``, final error and :func:`stall_diagnostics`.
    The runs of one ``m`` share its design and run in lockstep (one pair of products per
    iteration for all dampings)."""
    c = STALL[setting]
    rows = []
    for m in c["ms"]:
        (P,) = matrix_sensing_family(c["n"], c["r_star"], (c["kappa"],), num_measurements=m, psd=True, seed=0)
        sigma_min = 1.0 / c["kappa"]
        t0 = time.perf_counter()
        res = scaled_gd_lockstep([P], c["r"], [dict(problem=0, eta=c["eta"], damping=lam * sigma_min, init="random",
                                                     init_scale=c["alpha"], maxiter=c["maxiter"], tol=c["tol"])
                                                for lam in c["lams"]])
        wall = time.perf_counter() - t0
        for lam, r in zip(c["lams"], res):
            d = stall_diagnostics(P, r.factors[0], c["r_star"])
            rows.append(dict(m=m, lam=lam, iterations=r.iterations_to(c["tol"]), final_error=r.relative_errors[-1],
                             errors=_short(r.relative_errors[::10]), **d))
            print(f"stall study m={m:6d} lambda={lam:g} sigma_min: its {rows[-1]['iterations']}, final "
                  f"{rows[-1]['final_error']:.2e}, extra Y^T Y eigenvalues "
                  f"{', '.join(f'{v:.1e}' for v in d['gram_eigenvalues'][c['r_star']:])}, "
                  f"||Q A*(y) Q|| = {d['backprojection_out_norm']:.3f} (sigma_min {d['sigma_min']:.3f})", flush=True)
        print(f"  ({wall:.0f} s for m = {m})", flush=True)
        del P, res
    return {"setting": setting, "config": c, "rows": rows}


def run_stall_trace(setting: str, iterations: int = 100) -> dict:
    """The first ``iterations`` of the smallest-``m``, ``lambda = sigma_min`` run of the study: per
    iteration the eigenvalues of ``Y^T Y`` and the energy of ``Y`` outside range(M*) (squared
    singular values of ``Q Y``), to show when the overparameterized directions leave the
    ``alpha^2`` scale."""
    c = STALL[setting]
    m, lam = c["ms"][0], c["lams"][0]
    (P,) = matrix_sensing_family(c["n"], c["r_star"], (c["kappa"],), num_measurements=m, psd=True, seed=0)
    U = torch.linalg.eigh(P.X_star)[1][:, -c["r_star"]:]
    Q = torch.eye(c["n"], dtype=U.dtype) - U @ U.T
    rows = []

    def record(it, factors):
        Y = factors[0]
        rows.append(dict(iteration=it, gram=[float(v) for v in torch.linalg.svdvals(Y) ** 2],
                         outside=[float(v) for v in torch.linalg.svdvals(Q @ Y)[:3] ** 2],
                         error=P.relative_error(Y @ Y.T)))

    scaled_gd(P, c["r"], eta=c["eta"], damping=lam / c["kappa"], init="random", init_scale=c["alpha"],
              maxiter=iterations, tol=0.0, callback=record)
    for r in rows[:12] + rows[12::10]:
        print(f"trace t={r['iteration']:4d} error {r['error']:.2e}  Y^T Y " + " ".join(f"{v:.1e}" for v in r["gram"])
              + "  outside range(M*) " + " ".join(f"{v:.1e}" for v in r["outside"]), flush=True)
    return {"setting": setting, "m": m, "lam": lam, "config": c, "rows": rows}


def _short(errs) -> list[float]:
    return [float(f"{e:.4g}") for e in errs]


def _curves_to_json(fig2_curves: dict, over_curves: dict) -> dict:
    """``{panel: {kappa: [scaled_errors, gd_errors]}}`` at 4 significant digits (for redrawing)."""
    panels = dict(fig2_curves, overparameterized=over_curves)
    return {name: {str(k): [_short(a), _short(b)] for k, (a, b) in cs.items()} for name, cs in panels.items()}


PANELS = ("sensing", "completion", "overparameterized")


def plot_result(result: dict, path: Path) -> None:
    """Draw the three panels from a result dict (as written to ``scaled_gd.json``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    oc = cfg["over"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = dict(zip((1, 5, 10, 20, 100), ("C0", "C1", "C2", "C3", "C4")))
    titles = {
        "sensing": f"matrix sensing n={cfg['sensing']['n']}, r={cfg['sensing']['r']}, m=5nr",
        "completion": f"matrix completion n={cfg['completion']['n']}, r={cfg['completion']['r']}, "
                      f"p={cfg['completion']['p']}",
        "overparameterized": f"PSD sensing n={oc['n']}, r*={oc['r_star']}, r'={oc['r']}, m={oc['m']}, "
                             f"α={oc['alpha']:g}, λ={oc['lam']:g}σ_min",
    }
    for ax, name in zip(axes, PANELS):
        cs = result["curves"].get(name, {})
        if not cs:
            ax.text(0.5, 0.5, f"{name}: not run (see --problems)", ha="center", va="center", transform=ax.transAxes)
        for kappa, (s_err, g_err) in cs.items():
            kappa = int(kappa)
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


def merge_results(new: dict, old: dict) -> dict:
    """``new`` plus the panels of ``old`` that ``new`` did not run (same setting and truth),
    so panels run separately (e.g. the hour-long sensing one) end up in one JSON and figure."""
    if (old.get("setting"), old.get("truth")) != (new["setting"], new["truth"]):
        raise ValueError(f"--merge: {old.get('setting')}/{old.get('truth')} results cannot be merged into "
                         f"{new['setting']}/{new['truth']} ones; use another --out.")
    keep = [p for p in old.get("problems", []) if p not in new["problems"]]
    out = dict(new, config=dict(new["config"]), curves=dict(new["curves"]), wall_s=dict(new["wall_s"]))
    out["problems"] = [p for p in PANELS if p in new["problems"] or p in keep]
    out["table"] = [row for row in old["table"] if row[0] in keep] + new["table"]
    out["table"].sort(key=lambda row: PANELS.index(row[0]))
    for p in keep:
        out["curves"][p] = old.get("curves", {}).get(p, {})
        if p in old.get("wall_s", {}):
            out["wall_s"][p] = old["wall_s"][p]
        if p in ("sensing", "completion"):
            out["config"][p] = old["config"][p]
    if "overparameterized" in keep:
        out["overparameterized"], out["config"]["over"] = old["overparameterized"], old["config"]["over"]
    return out


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
    ap.add_argument("--merge", action="store_true",
                    help="keep the panels of an existing <out>/scaled_gd.json that this run does not redo "
                         "(same setting and truth), and draw the figure from all of them")
    ap.add_argument("--plot-only", action="store_true", help="redraw the figure from <out>/scaled_gd.json")
    ap.add_argument("--stall-study", action="store_true",
                    help="run only the kappa = 100 ScaledGD(lambda) study over m and lambda (STALL[setting]) and "
                         "write <out>/scaled_gd_stall.json")
    ap.add_argument("--stall-trace", action="store_true",
                    help="trace the first 100 iterations of the study's smallest-m, lambda = sigma_min run "
                         "(<out>/scaled_gd_stall_trace.json)")
    ap.add_argument("--out", default="out")
    args = ap.parse_args(argv)
    problems = tuple(p for p in args.problems.split(",") if p)
    bad = set(problems) - set(PANELS)
    if bad:
        ap.error(f"unknown panel(s) {sorted(bad)}; choose from sensing, completion, overparameterized")
    setting = "fast" if args.fast else "paper" if args.paper else args.setting
    truth = args.truth or ("authors" if setting == "paper" else "independent")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "scaled_gd.json", out / "scaled_gd_reproduction.png"
    if args.plot_only:
        result = json.loads(json_path.read_text())
        plot_result(result, png_path)
        print(f"wrote {png_path}")
        return result
    torch.set_num_threads(1)
    for wanted, run, name in ((args.stall_trace, run_stall_trace, "scaled_gd_stall_trace.json"),
                              (args.stall_study, run_stall_study, "scaled_gd_stall.json")):
        if wanted:  # a diagnostic study on its own, into its own JSON
            study = run("fast" if setting == "fast" else "paper")
            with open(out / name, "w") as f:
                json.dump(study, f, indent=1)
            print(f"wrote {out / name}")
            return study
    fig2 = run_tong_figure2(setting, truth, tuple(p for p in problems if p != "overparameterized"))
    over = run_overparameterized(setting) if "overparameterized" in problems else {"curves": {}, "rows": []}
    cfg = SETTINGS[setting]
    result = {"setting": setting, "truth": truth, "problems": [p for p in PANELS if p in problems],
              "config": {k: v for k, v in cfg.items()}, "table": fig2["table"], "wall_s": fig2["wall_s"],
              "overparameterized": over["rows"], "curves": _curves_to_json(fig2["curves"], over["curves"])}
    if args.merge and json_path.exists():
        result = merge_results(result, json.loads(json_path.read_text()))
    plot_result(result, png_path)
    tol, maxiter = result["config"]["tol"], result["config"]["maxiter"]
    print(f"\n{'problem':11s} {'kappa':>5s} {'ScaledGD its':>13s} {'GD its':>8s} {'ScaledGD s':>11s} {'GD s':>7s}"
          f"  (to {tol:g}, <= {maxiter})")
    fmt = lambda t: f"{t:.2f}" if t is not None else "lockstep"  # noqa: E731
    for name, kappa, a, b, ta, tb in result["table"]:
        print(f"{name:11s} {kappa:5d} {str(a):>13s} {str(b) if b is not None else '>' + str(maxiter):>8s} "
              f"{fmt(ta):>11s} {fmt(tb):>7s}")
    print(f"\n{'overparam.':11s} {'kappa':>5s} {'ScaledGD(λ)':>12s} {'GD':>8s} {'final S(λ)':>11s} {'final GD':>9s}"
          f"  (to {result['config']['over']['tol']:g})")
    for kappa, a, b, ea, eb in result["overparameterized"]:
        print(f"{'PSD':11s} {kappa:5d} {str(a):>12s} {str(b):>8s} {ea:11.2e} {eb:9.2e}")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {png_path} and {json_path}")
    return result


if __name__ == "__main__":
    main()
