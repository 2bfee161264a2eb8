"""ScaledGD vs GD: cost per iteration and total time to relative error 1e-10, same problems, same run.

Per-iteration time counts the update only (gradient of the loss at L R^T, the two r x r
preconditioner solves for ScaledGD, the factor update), not the error bookkeeping.

    python benchmarks/bench_scaled_gd.py [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from solvers import factored_gd, matrix_completion_problem, matrix_sensing_problem, scaled_gd


def per_iteration(P, rank, iters, repeats):
    out = {"scaled_gd": [], "gd": []}
    for _ in range(repeats):
        s = scaled_gd(P, rank, maxiter=iters, tol=0.0)
        g = factored_gd(P, rank, maxiter=iters, tol=0.0)
        out["scaled_gd"].append(s.times[-1] / s.nit)
        out["gd"].append(g.times[-1] / g.nit)
    return {k: statistics.median(v) for k, v in out.items()}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    problems = [
        ("sensing n=60, r=10, m=5nr", lambda k: matrix_sensing_problem(60, 10, k, seed=0), 10),
        ("completion n=1000, r=10, p=0.2", lambda k: matrix_completion_problem(1000, 10, k, p=0.2, seed=0), 10),
    ]
    for name, make, r in problems:
        P = make(10)
        it = per_iteration(P, r, 30, args.repeats)
        s = scaled_gd(P, r, maxiter=1000, tol=1e-10)
        g = factored_gd(P, r, maxiter=3000, tol=1e-10)
        rows.append((name, it["scaled_gd"], it["gd"], s.iterations_to(1e-10), s.times[-1],
                     g.iterations_to(1e-10), g.times[-1], g.converged))
    print(f"torch {torch.__version__}, {args.threads} thread(s), float64, kappa = 10, eta = 0.5 (GD: 0.5/sigma_max)\n")
    print("| problem | ms/iter ScaledGD | ms/iter GD | ratio | its to 1e-10 ScaledGD | time [s] | its to 1e-10 GD | time [s] |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, a, b, si, st, gi, gt, gc in rows:
        gis = str(gi) if gc else "> 3000"
        print(f"| {name} | {1e3 * a:.2f} | {1e3 * b:.2f} | {a / b:.2f} | {si} | {st:.2f} | {gis} | {gt:.2f} |")
    return rows


if __name__ == "__main__":
    main()
