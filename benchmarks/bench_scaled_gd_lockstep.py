"""Figure-2 sensing: eight runs (ScaledGD and GD at kappa = 1, 5, 10, 20) on one Gaussian design,
separately vs in lockstep (``scaled_gd_lockstep``), same run, interleaved repeats, medians.

Separately, every run reads the ``m x n^2`` design twice per iteration; in lockstep one
``[m, n^2] @ [n^2, 8]`` product pair serves all eight.  Both do ``--iters`` iterations per run
(``tol = 0``), so the work per run is the same; the ratio is wall time separate / lockstep.

    python benchmarks/bench_scaled_gd_lockstep.py [--n 100 --r 10 --iters 20 --repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from solvers import matrix_sensing_family, scaled_gd, scaled_gd_lockstep

KAPPAS = (1, 5, 10, 20)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--r", type=int, default=10)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    fam = matrix_sensing_family(args.n, args.r, KAPPAS, seed=0)
    runs = [dict(problem=i, eta=0.5, maxiter=args.iters, tol=0.0, preconditioned=pre)
            for i in range(len(KAPPAS)) for pre in (True, False)]
    sep, lock = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for spec in runs:
            scaled_gd(fam[spec["problem"]], args.r, **{k: v for k, v in spec.items() if k != "problem"})
        sep.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        scaled_gd_lockstep(fam, args.r, runs)
        lock.append(time.perf_counter() - t0)
    a, b = statistics.median(sep), statistics.median(lock)
    m = fam[0].m
    print(f"sensing n={args.n}, r={args.r}, m={m} (design {m * args.n ** 2 * 8 / 1e9:.2f} GB float64), "
          f"8 runs x {args.iters} iterations, {args.threads} thread(s), median of {args.repeats}:")
    print(f"  separate {a:.2f} s, lockstep {b:.2f} s, ratio {a / b:.2f}x")
    return {"separate_s": a, "lockstep_s": b, "ratio": a / b}


if __name__ == "__main__":
    main()
