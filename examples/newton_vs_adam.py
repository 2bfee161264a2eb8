"""Approximate-Newton training (NewtonCG on the GGN, GNSNewton) against Adam.

NewtonCG runs twice: plain CG, and CG preconditioned with Martens' diagonal
``(diag(empirical Fisher) + λ)^{-3/4}``.

The problem is the classic Hessian-free benchmark in miniature: a deep tanh
autoencoder (bottleneck 4) on synthetic data lying near a 3-dimensional nonlinear
manifold in R^20, trained full-batch with the mean squared reconstruction error.
Every method starts from the same initial weights.  Adam's learning rate is the best
of a small grid, chosen twice: on the loss at equal iterations, and on the loss at
equal wall time (a smaller rate wins when Adam may run thousands of iterations).

Output: ``<out>/newton_vs_adam.png`` (loss vs iterations and vs wall time) and a
table with the loss of each method at equal iterations and at equal wall time (the
time NewtonCG took for its iterations; Adam keeps running until it has used that
much time).  Timings exclude the loss evaluations made for the curves.

    python examples/newton_vs_adam.py            # ~1 minute on one CPU thread
    python examples/newton_vs_adam.py --fast     # seconds
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

from solvers import GNSNewton, NewtonCG
from solvers.newton_cg import diagonal_preconditioner


def make_data(n: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """``n`` points near a 3-d nonlinear manifold in R^20 (fixed random map plus noise)."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.rand(n, 3, generator=g, dtype=dtype) * 2 - 1
    A = torch.randn(3, 12, generator=g, dtype=dtype)
    B = torch.randn(12, 20, generator=g, dtype=dtype) / 12**0.5
    X = torch.tanh(2 * latent @ A) @ B
    return X + 0.01 * torch.randn(n, 20, generator=g, dtype=dtype)


def make_model(width: int, seed: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(20, width), nn.Tanh(), nn.Linear(width, 4), nn.Tanh(),
        nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 20),
    ).to(dtype)


def run_second_order(name: str, model: nn.Module, X: torch.Tensor, iters: int, cg_maxiter: int):
    loss_fn = nn.MSELoss()
    if name.startswith("NewtonCG"):
        precond = diagonal_preconditioner(model, loss_fn) if "precond" in name else None
        opt = NewtonCG(model.parameters(), model=model, loss_fn=loss_fn, curvature="ggn",
                       damping=1.0, cg_maxiter=cg_maxiter, cg_tol=1e-4, preconditioner=precond)
    else:
        opt = GNSNewton(model.parameters(), model=model, loss_fn=loss_fn, curvature="ggn",
                        cg_maxiter=cg_maxiter, cg_tol=1e-4)
    losses, times, elapsed = [_loss(model, X)], [0.0], 0.0
    for _ in range(iters):
        t0 = time.perf_counter()
        opt.step(batch=(X, X))
        elapsed += time.perf_counter() - t0
        times.append(elapsed)
        losses.append(_loss(model, X))  # evaluation outside the timed region
    return losses, times


def run_adam(model: nn.Module, X: torch.Tensor, lr: float, iters: int | None, time_budget: float | None):
    loss_fn = nn.MSELoss()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses, times = [_loss(model, X)], [0.0]
    elapsed, k = 0.0, 0
    while (iters is not None and k < iters) or (time_budget is not None and elapsed < time_budget):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss_fn(model(X), X).backward()
        opt.step()
        elapsed += time.perf_counter() - t0
        k += 1
        times.append(elapsed)
        losses.append(_loss(model, X))
    return losses, times


def _loss(model: nn.Module, X: torch.Tensor) -> float:
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(X), X))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="tiny run (seconds), used by the tests")
    parser.add_argument("--out", default="out", help="output directory (default: out/)")
    parser.add_argument("--iters", type=int, default=None, help="second-order iterations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = torch.float32
    n, width, iters, cg_maxiter = (256, 16, 15, 20) if args.fast else (1024, 32, 100, 50)
    iters = args.iters or iters
    adam_lrs = (3e-3, 1e-2) if args.fast else (1e-3, 3e-3, 1e-2, 3e-2)
    X = make_data(n, args.seed, dtype)

    results = {}
    for name in ("NewtonCG (GGN)", "NewtonCG (GGN, diag precond)", "GNSNewton (GGN)"):
        results[name] = run_second_order(name, make_model(width, args.seed + 1, dtype), X, iters, cg_maxiter)
    budget = results["NewtonCG (GGN)"][1][-1]
    # Adam gets its best learning rate twice: for equal iterations and for equal time.
    by_iters = {lr: run_adam(make_model(width, args.seed + 1, dtype), X, lr, iters, None) for lr in adam_lrs}
    by_time = {lr: run_adam(make_model(width, args.seed + 1, dtype), X, lr, None, budget) for lr in adam_lrs}
    lr_it = min(adam_lrs, key=lambda lr: by_iters[lr][0][-1])
    lr_t = min(adam_lrs, key=lambda lr: by_time[lr][0][-1])
    results[f"Adam (lr={lr_it:g}, best @ it)"] = by_iters[lr_it]
    results[f"Adam (lr={lr_t:g}, best @ time)"] = by_time[lr_t]

    os.makedirs(args.out, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, (losses, times) in results.items():
        ax1.semilogy(range(len(losses)), losses, label=name)
        ax2.semilogy(times, losses, label=name)
    ax1.set_xlabel("iteration")
    ax1.set_xlim(0, iters)
    ax2.set_xlabel("wall time (s, one CPU thread)")
    for ax in (ax1, ax2):
        ax.set_ylabel("training loss (MSE)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Tanh autoencoder 20-{width}-4-{width}-20, {n} points, full batch")
    fig.tight_layout()
    path = os.path.join(args.out, "newton_vs_adam.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)

    summary = {}
    print(f"{'method':<30} {'loss @ ' + str(iters) + ' it':>14} {'time (s)':>9} {'loss @ ' + f'{budget:.2f}s':>14} {'iters @ time':>12}")
    for name, (losses, times) in results.items():
        at_iters = losses[min(iters, len(losses) - 1)]
        t_iters = times[min(iters, len(times) - 1)]
        row = dict(loss_at_iters=at_iters, time_at_iters=t_iters)
        if "best @ it" in name:  # stopped after `iters` iterations: no equal-time value
            at_time = "n/a"
            k_time = "n/a"
        else:
            k = max(i for i, t in enumerate(times) if t <= budget + 1e-12)
            row.update(loss_at_time=losses[k], iters_at_time=k)
            at_time, k_time = f"{losses[k]:.3e}", str(k)
        summary[name] = row
        print(f"{name:<30} {at_iters:>14.3e} {t_iters:>9.2f} {at_time:>14} {k_time:>12}")
    print(f"plot: {path}")
    return summary


if __name__ == "__main__":
    main()
