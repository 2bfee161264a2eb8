"""``python -m curvature eos``: reproduce the edge of stability on a built-in problem.

Full-batch gradient descent at several learning rates with the sharpness tracked
against ``2/lr`` (:func:`estimators.eos.run_edge_of_stability`); writes ``eos.png``
(loss and sharpness vs step, dashed lines at ``2/lr``) and ``eos.json`` into ``--out``
and prints a table.  No downloads: the data are generated.

This module is command-line glue.  It imports ``estimators`` lazily inside
:func:`main`, so ``import curvature`` never pulls in ``estimators`` (the layering rule).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


def _floats(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not vals or any(not v > 0 for v in vals):
        raise argparse.ArgumentTypeError(f"learning rates must be positive, got {text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``curvature eos``."""
    p = argparse.ArgumentParser(
        prog="curvature eos",
        description="Edge of stability: full-batch GD at several learning rates; sharpness (largest "
                    "Hessian eigenvalue, warm-started Lanczos) tracked against 2/lr. Writes eos.png and "
                    "eos.json (and eos_quadratic.* for --problem quadratic/both).",
    )
    p.add_argument("--problem", choices=("tanh", "quadratic", "both"), default="tanh",
                   help="tanh: 1-100-1 tanh net on 20 Chebyshev T3 points (the EoS code's toy); "
                        "quadratic: second-order regression model with explicit Hessian (default: tanh)")
    p.add_argument("--lrs", type=_floats, default=None, help="comma-separated learning rates (default per problem)")
    p.add_argument("--steps", type=int, default=None, help="GD steps per learning rate (default per problem)")
    p.add_argument("--every", type=int, default=None,
                   help="measure every N steps (default per problem: every step for tanh; an even N sees only "
                        "one phase of a period-2 oscillation and biases the median)")
    p.add_argument("--out", default="out", help="output directory (default: out)")
    p.add_argument("--fast", action="store_true", help="cheap setting (seconds)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    p.add_argument("--init", choices=("private", "authors"), default="private",
                   help="tanh net initialisation: private generator (default) or the official code's "
                        "torch.manual_seed + float32 xavier_normal_ calls and float32 grid")
    p.add_argument("--k", type=int, default=1, help="top eigenvalues per measurement (default 1)")
    p.add_argument("--tol", type=float, default=1e-4, help="Lanczos relative residual tolerance (default 1e-4)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (0 on success)."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    import torch

    from estimators.eos import run_edge_of_stability

    dtype = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
    problems = ("tanh", "quadratic") if args.problem == "both" else (args.problem,)
    for problem in problems:
        res = run_edge_of_stability(
            lrs=args.lrs, steps=args.steps, every=args.every, out_dir=args.out, fast=args.fast,
            seed=args.seed, problem=problem, dtype=dtype, device=args.device, k=args.k, tol=args.tol,
            filename="eos" if problem == "tanh" else "eos_quadratic",
            init=args.init if problem == "tanh" else "private",
        )
        print(f"\n[{problem}] full-batch GD; onset = first sharpness >= 0.95 x 2/lr")
        print(res.table())
        print(f"wrote {res.png} and {res.json}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
