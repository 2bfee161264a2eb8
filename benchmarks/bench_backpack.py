"""Benchmark: the BackPACK-backed diagonals and K-FAC against BackPACK run directly, same run.

For each quantity, "BackPACK directly" is what a user writes by hand with the model
extended ONCE outside the timed region: forward, loss, ``with backpack(ext):
loss.backward()``, read the attribute.  The toolkit's call (``ggn_diagonal``,
``hessian_diagonal``, ``kfac``) is timed end to end, including its argument checks, the
data scan and the per-call setup.  Times are the process's CPU time
(``time.process_time``, one thread: less sensitive to other processes on a shared machine
than wall time), medians of interleaved repeats; the ratio is what counts.

Workloads (float32): ``mlp`` 784-256-256-10 tanh, N=256 (the estimator benchmark's MLP
on a smaller batch: 2 shared cores); ``small`` 20-32-32-5 tanh, N=128 (per-call overheads show).

Run:  python benchmarks/bench_backpack.py --repeats 7 --out benchmarks/results_backpack.md
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # benchmark the checkout this script lives in (not the editable install)
    sys.path.insert(0, REPO)

import torch  # noqa: E402
from torch import nn  # noqa: E402

import curvature  # noqa: E402


def make(kind: str):
    torch.manual_seed(0)
    sizes = (784, 256, 256, 10) if kind == "mlp" else (20, 32, 32, 5)
    n = 256 if kind == "mlp" else 128
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1])
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(n, sizes[0], generator=g), torch.randint(0, sizes[-1], (n,), generator=g)
    return model, X, y


def backpack_direct(model, X, y, ext, attr):
    """A closure running BackPACK by hand on a once-extended copy (setup not timed)."""
    import backpack

    work = backpack.extend(copy.deepcopy(model).eval())
    lf = backpack.extend(nn.CrossEntropyLoss())
    params = list(work.parameters())

    def run():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss = lf(work(X), y)
            with backpack.backpack(ext):
                loss.backward()
        out = [getattr(p, attr) for p in params]
        for p in params:
            delattr(p, attr)
            p.grad = None
        return out

    return run


def round_robin(fns: dict, repeats: int) -> dict:
    for fn in fns.values():
        fn()
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.process_time()
            fn()
            ts[k].append(time.process_time() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def bench(kind: str, repeats: int, rows: list[str]) -> None:
    from backpack import extensions as ex

    model, X, y = make(kind)
    lf = nn.CrossEntropyLoss()
    data = (X, y)
    pairs = {
        "exact GGN diagonal": (lambda: curvature.ggn_diagonal(model, lf, data),
                               backpack_direct(model, X, y, ex.DiagGGNExact(), "diag_ggn_exact")),
        "MC GGN diagonal": (lambda: curvature.ggn_diagonal(model, lf, data, kind="mc"),
                            backpack_direct(model, X, y, ex.DiagGGNMC(), "diag_ggn_mc")),
        "Hessian diagonal": (lambda: curvature.hessian_diagonal(model, lf, data),
                             backpack_direct(model, X, y, ex.DiagHessian(), "diag_h")),
        "K-FAC factors, KFLR (hooks)": (lambda: curvature.kfac(model, lf, data, separate_bias=True),
                                        backpack_direct(model, X, y, ex.KFLR(), "kflr")),
        "K-FAC factors, MC (hooks)": (lambda: curvature.kfac(model, lf, data, kind="mc", separate_bias=True),
                                      backpack_direct(model, X, y, ex.KFAC(), "kfac")),
        "K-FAC factors, KFRA (BackPACK)": (lambda: curvature.kfac(model, lf, data, kind="kfra", separate_bias=True),
                                           backpack_direct(model, X, y, ex.KFRA(), "kfra")),
    }
    fns = {}
    for key, (ours, theirs) in pairs.items():
        fns[f"{key} | ours"] = ours
        fns[f"{key} | BackPACK"] = theirs
    med = round_robin(fns, repeats)
    n = sum(p.numel() for p in model.parameters())
    rows.append(f"\n### {kind}: {n:,} parameters, N={X.shape[0]}, float32, 1 thread\n")
    rows.append("| quantity | ours ms | BackPACK directly ms | ours / BackPACK |")
    rows.append("| --- | ---: | ---: | ---: |")
    for key in pairs:
        a, b = med[f"{key} | ours"], med[f"{key} | BackPACK"]
        rows.append(f"| {key} | {1e3 * a:.1f} | {1e3 * b:.1f} | {a / b:.3f}x |")
    for line in rows[-(len(pairs) + 3):]:
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--models", default="mlp,small")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from importlib.metadata import version

    rows = ["## BackPACK paths vs BackPACK run directly", "",
            f"torch {torch.__version__}, backpack-for-pytorch {version('backpack-for-pytorch')}; medians of {args.repeats} "
            f"interleaved repeats; command: `python benchmarks/bench_backpack.py --repeats {args.repeats}`"]
    for kind in args.models.split(","):
        bench(kind, args.repeats, rows)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
