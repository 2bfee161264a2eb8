"""Benchmark: does ``torch.compile`` of the per-batch product beat the eager double-backward product on CPU?

Workloads: the benchmark MLP 784-256-256-10 (tanh, N=2048) and the small CNN (N=512) of
``bench_operators.py`` (same builders), cross-entropy, float32, one thread.

Rows, in units of one eager gradient (forward + backward) measured in the same process,
interleaved round-robin, medians of ``--repeats``:

* ``curvature.HessianOperator`` / ``GGNOperator`` (eager double backward; GGN with the
  double-vjp trick), cached single-batch graph and fresh (``cache=False``);
* the eager ``torch.func`` products: HVP ``jvp(grad(loss))`` (forward-over-reverse) and the
  GGN ``vjp(jvp)`` with the closed-form softmax cross-entropy output Hessian;
* the same two functions under ``torch.compile`` (``--backend``, default inductor), steady
  state, plus the compile time (first call minus one steady call, wall seconds) and the
  relative difference of every product to the eager operator's.

Run:  python benchmarks/bench_compile.py --repeats 5 --out benchmarks/results_compile.md
      python benchmarks/bench_compile.py --quick      # MLP only, 3 repeats
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # benchmark the checkout this script lives in
    sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, grad, jvp, vjp  # noqa: E402

import curvature  # noqa: E402
from bench_operators import make_cnn, make_mlp, round_robin  # noqa: E402


def func_products(model: nn.Module, X: torch.Tensor, y: torch.Tensor):
    """``(hvp, ggn_vp)``: pure functions ``(params, v) -> product`` over tuples of parameter-shaped tensors.

    ``hvp`` is ``jvp(grad(loss))`` (one forward-over-reverse pass); ``ggn_vp`` is ``J^T H_z J v``
    with ``J v`` by ``jvp``, ``H_z u = (diag(p) - p p^T) u / N`` (mean cross-entropy, ``p =
    softmax(z)``) and ``J^T`` by ``vjp``.  Both are what a compiled product path would run.
    """
    names = [n for n, _ in model.named_parameters()]
    N = X.shape[0]

    def logits(params):
        return functional_call(model, dict(zip(names, params)), (X,))

    def loss(params):
        return F.cross_entropy(logits(params), y)

    def hvp(params, v):
        return jvp(grad(loss), (params,), (v,))[1]

    def ggn_vp(params, v):
        z, Jv = jvp(logits, (params,), (v,))
        p = torch.softmax(z, dim=-1)
        pJv = p * Jv
        u = (pJv - p * pJv.sum(-1, keepdim=True)) / N
        return vjp(logits, params)[1](u)[0]

    return hvp, ggn_vp


def _flat(parts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in parts])


def bench(name: str, make, repeats: int, backend: str) -> list[str]:
    model, X, y = make()
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    detached = tuple(p.detach() for p in params)
    n = sum(p.numel() for p in params)
    v = torch.randn(n, generator=torch.Generator().manual_seed(2))
    v_parts = tuple(curvature.unflatten(v, [p.shape for p in params]))
    hvp, ggn_vp = func_products(model, X, y)

    ops = {"Hessian": curvature.HessianOperator, "GGN": curvature.GGNOperator}
    kw = {"Hessian": {}, "GGN": {"jvp": "reverse"}}
    truth = {k: cls(model, loss_fn, (X, y), **kw[k]) @ v for k, cls in ops.items()}
    fns, diffs, compile_s = {}, {}, {}

    def gradient():
        torch.autograd.grad(loss_fn(model(X), y), params)

    fns["gradient (eager, the unit)"] = gradient
    for k, cls in ops.items():
        cached = cls(model, loss_fn, (X, y), **kw[k])
        fresh = cls(model, loss_fn, (X, y), cache=False, **kw[k])
        fns[f"{k}: curvature operator, cached"] = lambda o=cached: o @ v
        fns[f"{k}: curvature operator, fresh"] = lambda o=fresh: o @ v
    for k, fn in (("Hessian", hvp), ("GGN", ggn_vp)):
        label = "jvp(grad)" if k == "Hessian" else "vjp(jvp)"
        fns[f"{k}: torch.func {label}, eager"] = lambda fn=fn: fn(detached, v_parts)
        diffs[f"{k}: torch.func {label}, eager"] = fn(detached, v_parts)
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend=backend, dynamic=False)
        t0 = time.perf_counter()
        try:
            first = compiled(detached, v_parts)
        except Exception as exc:  # noqa: BLE001 - a failure to compile is the measurement
            compile_s[f"{k}: torch.func {label}, compiled ({backend})"] = f"fails: {type(exc).__name__}: " \
                f"{str(exc).splitlines()[0][:120]}"
            continue
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiled(detached, v_parts)
        key = f"{k}: torch.func {label}, compiled ({backend})"
        compile_s[key] = t_first - (time.perf_counter() - t0)
        fns[key] = lambda c=compiled: c(detached, v_parts)
        diffs[key] = first
    t = round_robin(fns, repeats)
    unit = t["gradient (eager, the unit)"]
    lines = [f"### {name}: {n:,} parameters, N = {X.shape[0]}, float32, 1 thread", "",
             f"One eager gradient: **{1e3 * unit:.2f} ms** (the unit).", "",
             "| product (1 column) | ms | / gradient | compile s | rel. diff to operator |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for key, sec in t.items():
        kind = key.split(":")[0]
        diff = f"{float((_flat(diffs[key]) - truth[kind]).norm() / truth[kind].norm()):.1e}" if key in diffs else ""
        cs = compile_s.get(key, "")
        lines.append(f"| {key} | {1e3 * sec:.2f} | {sec / unit:.2f}x | "
                     f"{cs if isinstance(cs, str) else f'{cs:.1f}'} | {diff} |")
    lines += [f"| {key} | | | {msg} | |" for key, msg in compile_s.items() if isinstance(msg, str)]
    return lines + [""]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, ...)")
    ap.add_argument("--quick", action="store_true", help="MLP only, 3 repeats")
    ap.add_argument("--out", default=None, help="write the markdown here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.models, args.repeats = "mlp", 3
    cmd = "python benchmarks/bench_compile.py" + (" --quick" if args.quick else
                                                  f" --repeats {args.repeats} --models {args.models}")
    if args.backend != "inductor":
        cmd += f" --backend {args.backend}"
    out = ["## torch.compile of the per-batch product (CPU)", "",
           f"Command: `{cmd}` (torch {torch.__version__}; medians of {args.repeats} round-robin repeats, every "
           "row interleaved per round; compile time = first call minus one steady call, wall seconds).", ""]
    builders = {"mlp": ("MLP 784-256-256-10 tanh", make_mlp), "cnn": ("CNN 2 conv + linear", make_cnn)}
    for key in args.models.split(","):
        section = bench(*builders[key], args.repeats, args.backend)
        print("\n".join(section), flush=True)
        out += section
    text = "\n".join(out)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
