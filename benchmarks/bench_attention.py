"""Benchmark: what exact derivatives through attention cost against the user's fused training kernels.

Workload (float32, ``torch.set_num_threads(1)``): a small transformer classifier,
``Linear(16, d) -> TransformerEncoderLayer(d, heads, 2d, batch_first, no dropout) ->
mean over tokens -> Linear(d, 10)``, cross-entropy, one batch of ``B`` sequences of
``T`` tokens (``--size small``: d=64, 4 heads, B=16, T=32; ``--size long``: T=128).

Rows, all in units of the *fused-kernel gradient* (forward + backward of the loss with
PyTorch's default kernels: flash SDPA on CPU), measured in the same run, interleaved
round-robin, medians of ``--repeats``:

* the same gradient inside :func:`curvature.kernels.derivative_kernels` (math SDPA, no
  fast path): the price of the kernel switch alone;
* an eval-mode forward with default kernels (fast path on) vs inside the context;
* Hessian and GGN products per column: cold (graph built inside the timed region, what
  each batch of a loader costs) and warm (single-batch cached graph, what Lanczos / CG
  pay per call), for 1 and 8 columns; GGN with the double-vjp trick and forward mode.

Run:  python benchmarks/bench_attention.py --repeats 7 --out benchmarks/results_attention.md
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import curvature
from curvature.kernels import derivative_kernels


class Classifier(nn.Module):
    def __init__(self, d_in=16, width=64, heads=4, classes=10):
        super().__init__()
        self.embed = nn.Linear(d_in, width)
        self.layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.layer(self.embed(x)).mean(1))


def round_robin(fns: dict, repeats: int) -> dict:
    """Median seconds per function, timed in interleaved rounds (fair under a varying machine load)."""
    for fn in fns.values():
        fn()  # warm-up
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def workload(size: str):
    torch.manual_seed(0)
    T = 32 if size == "small" else 128
    model = Classifier()
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(16, T, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
    return model, X, y, T


def bench(size: str, repeats: int) -> list[str]:
    model, X, y, T = workload(size)
    loss_fn = nn.CrossEntropyLoss()
    params = [p for p in model.parameters()]
    n = sum(p.numel() for p in params)
    g = torch.Generator().manual_seed(2)
    v1 = torch.randn(n, 1, generator=g)
    v8 = torch.randn(n, 8, generator=g)

    def grad_default():
        torch.autograd.grad(loss_fn(model(X), y), params)

    def grad_context():
        with derivative_kernels(model, needs="second"):
            torch.autograd.grad(loss_fn(model(X), y), params)

    def forward_default():
        with torch.no_grad():
            model.eval()(X)

    def forward_context():
        with torch.no_grad(), derivative_kernels(model):
            model.eval()(X)

    ops = {
        "Hessian": lambda **kw: curvature.HessianOperator(model, loss_fn, (X, y), **kw),
        "GGN (double-vjp)": lambda **kw: curvature.GGNOperator(model, loss_fn, (X, y), jvp="reverse", **kw),
        "GGN (forward mode)": lambda **kw: curvature.GGNOperator(model, loss_fn, (X, y), jvp="forward", **kw),
    }
    warm = {name: make() for name, make in ops.items()}
    fns = {"gradient, default kernels": grad_default, "gradient, derivative_kernels": grad_context,
           "eval forward, default kernels (fast path)": forward_default,
           "eval forward, derivative_kernels": forward_context}
    cols = {}
    for name, make in ops.items():
        for k, V in ((1, v1), (8, v8)):
            fns[f"{name}, {k} col, cold"] = (lambda make=make, V=V: make(cache=False) @ V)
            fns[f"{name}, {k} col, warm"] = (lambda op=warm[name], V=V: op @ V)
            cols[f"{name}, {k} col, cold"] = cols[f"{name}, {k} col, warm"] = k
    t = round_robin(fns, repeats)
    unit = t["gradient, default kernels"]
    lines = [f"### T={T} tokens, B=16, d=64, 4 heads: {n:,} parameters, float32, 1 thread", "",
             f"One fused-kernel gradient (forward + backward, default kernels): **{1e3 * unit:.2f} ms** (the unit).", "",
             "| what | total ms | ms per column | per column / fused gradient |", "| --- | ---: | ---: | ---: |"]
    for k, sec in t.items():
        c = cols.get(k, 1)
        lines.append(f"| {k} | {1e3 * sec:.2f} | {1e3 * sec / c:.2f} | {sec / c / unit:.2f}x |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--sizes", nargs="+", default=["small", "long"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = ["## Attention: exact derivatives vs the user's fused kernels", "",
           f"torch {torch.__version__}; medians of {args.repeats} repeats, timed round-robin (all rows interleaved per "
           "round, fair under the shared machine's varying load); command: "
           f"`python benchmarks/bench_attention.py --repeats {args.repeats}"
           f"{' --out ' + args.out if args.out else ''}`", ""]
    for size in args.sizes:
        out += bench(size, args.repeats)
    text = "\n".join(out)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
