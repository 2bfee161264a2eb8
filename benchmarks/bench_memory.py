"""Benchmark: peak memory of curvature products and estimators, ours vs curvlinops 3.0.1.

Every case runs in its own subprocess (``--worker``): it builds the model and the data,
imports what it needs, records ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the
baseline), runs the case once, and reports the peak RSS minus the baseline (MB = 2^20
bytes), i.e. the memory the case added on top of the model and the data.  Float32, one
thread, one batch ``(X, y)`` (curvlinops gets ``[(X, y)]``; ``check_deterministic=False``,
so its construction runs no products), cross-entropy.

Workloads (as in bench_operators.py):
* ``mlp``: 784-256-256-10 tanh MLP (269,322 parameters), N=2048;
* ``cnn``: Conv(1,16,5,s2)-Tanh-Conv(16,32,5,s2)-Tanh-Linear(512,10) on 28x28 (18,346 parameters), N=512.

Cases: one Hessian-vector product, a 16-column Hessian block, a 16-column GGN block,
top-5 Hessian eigenvalues (ours ``top_eigenvalues(k=5, tol=1e-6)``, curvlinops
``scipy.sparse.linalg.eigsh(op.to_scipy(), k=5, tol=1e-6)``), a 100-probe Hutchinson trace
(ours ``hutchinson_trace(num_probes=100)``, blocks of 32; curvlinops
``hutchinson_trace(num_matvecs=100)``, one block of 100).  Extra rows show the memory
options: ``micro_batch_size=256``, ``max_block_bytes`` on wide blocks, ``top_eigenvalues``'s
``max_basis``, and curvlinops given the same data in batches of 256.

Run:  python benchmarks/bench_memory.py --out benchmarks/results_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (label, library, case, options); options go to the operator (ours) or the call
CASES = [
    ("HVP", "ours", "hvp", {}),
    ("HVP", "curvlinops", "hvp", {}),
    ("16-col Hessian block", "ours", "hess16", {}),
    ("16-col Hessian block", "curvlinops", "hess16", {}),
    ("16-col GGN block", "ours", "ggn16", {}),
    ("16-col GGN block", "curvlinops", "ggn16", {}),
    ("top-5 eigenvalues", "ours", "top5", {}),
    ("top-5 eigenvalues", "curvlinops", "top5", {}),
    ("Hutchinson trace, 100 probes", "ours", "trace100", {}),
    ("Hutchinson trace, 100 probes", "curvlinops", "trace100", {}),
    # the memory options
    ("HVP", "ours", "hvp", {"micro_batch_size": 256}),
    ("HVP", "curvlinops", "hvp", {"batches_of": 256}),
    ("16-col Hessian block", "ours", "hess16", {"micro_batch_size": 256}),
    ("16-col GGN block", "ours", "ggn16", {"micro_batch_size": 256}),
    ("top-5 eigenvalues", "ours", "top5", {"micro_batch_size": 256}),
    ("top-5 eigenvalues", "ours", "top5", {"max_basis": 20}),
    ("Hutchinson trace, 100 probes", "ours", "trace100", {"micro_batch_size": 256}),
    ("16-col Hessian block, vmapped (batched=True)", "ours", "hess16", {"batched": True, "max_block_bytes": None}),
    ("16-col Hessian block, vmapped (batched=True)", "ours", "hess16", {"batched": True, "budget_columns": 4}),
    ("Hutchinson trace, 100 probes in one block", "ours", "trace100", {"block_size": 100,
                                                                        "max_block_bytes": None}),
    ("Hutchinson trace, 100 probes in one block", "ours", "trace100", {"block_size": 100,
                                                                        "budget_columns": 16}),
]


def make(name: str):
    import torch
    from torch import nn

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
        X, y = torch.randn(2048, 784, generator=g), torch.randint(0, 10, (2048,), generator=g)
    else:
        model = nn.Sequential(nn.Conv2d(1, 16, 5, stride=2), nn.Tanh(), nn.Conv2d(16, 32, 5, stride=2), nn.Tanh(),
                              nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
        X, y = torch.randn(512, 1, 28, 28, generator=g), torch.randint(0, 10, (512,), generator=g)
    return model, X, y


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def worker(model_name: str, lib: str, case: str, options: dict) -> dict:
    import gc

    import numpy as np
    import torch
    from torch import nn

    torch.set_num_threads(1)
    sys.path.insert(0, ROOT)
    import curvature
    import estimators
    from scipy.sparse.linalg import eigsh

    if lib == "curvlinops":
        import curvlinops
    model, X, y = make(model_name)
    loss_fn = nn.CrossEntropyLoss()
    params = [p for p in model.parameters()]
    n = sum(p.numel() for p in params)
    g = torch.Generator().manual_seed(2)
    v = torch.randn(n, generator=g)
    V16 = torch.randn(n, 16, generator=g)
    opts = dict(options)
    budget_columns = opts.pop("budget_columns", None)
    if budget_columns is not None:  # a budget of that many columns of the base estimate (4 n float32 entries)
        opts["max_block_bytes"] = budget_columns * 4 * n * 4
    max_basis = opts.pop("max_basis", None)
    block_size = opts.pop("block_size", 32)
    batches_of = opts.pop("batches_of", None)
    gc.collect()
    base = maxrss_mb()
    t0 = time.perf_counter()
    if lib == "ours":
        if case == "ggn16":
            op = curvature.GGNOperator(model, loss_fn, (X, y), **opts)
        else:
            op = curvature.HessianOperator(model, loss_fn, (X, y), **opts)
        if case == "hvp":
            op @ v
        elif case in ("hess16", "ggn16"):
            op @ V16
        elif case == "top5":
            estimators.top_eigenvalues(op, 5, tol=1e-6, seed=0, max_basis=max_basis)
        elif case == "trace100":
            estimators.hutchinson_trace(op, 100, block_size=block_size, seed=0)
    else:
        data = [(X, y)] if batches_of is None else list(zip(X.split(batches_of), y.split(batches_of)))
        cls = curvlinops.GGNLinearOperator if case == "ggn16" else curvlinops.HessianLinearOperator
        op = cls(model, loss_fn, params, data, check_deterministic=False)
        if case == "hvp":
            op @ v
        elif case in ("hess16", "ggn16"):
            op @ V16
        elif case == "top5":
            eigsh(op.to_scipy(), k=5, which="LA", tol=1e-6, return_eigenvectors=False)
        elif case == "trace100":
            curvlinops.hutchinson_trace(op, 100)
    seconds = time.perf_counter() - t0
    del np
    return {"mb": maxrss_mb() - base, "baseline_mb": base, "seconds": seconds, "n": n}


def describe(lib: str, options: dict) -> str:
    if not options:
        return lib
    shown = []
    for k, v in options.items():
        if k == "budget_columns":
            shown.append(f"max_block_bytes={v} columns")
        elif k == "batches_of":
            shown.append(f"data in batches of {v}")
        else:
            shown.append(f"{k}={v}")
    return f"{lib}, " + ", ".join(shown)


def run_case(model_name, lib, case, options, repeats):
    rows = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--worker", model_name, lib, case, json.dumps(options)],
                             capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            raise RuntimeError(f"{model_name} {lib} {case} {options} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", nargs=4, metavar=("MODEL", "LIB", "CASE", "OPTIONS"))
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.worker:
        model_name, lib, case, options = args.worker
        print(json.dumps(worker(model_name, lib, case, json.loads(options))))
        return
    lines = ["# Peak memory: ours vs curvlinops 3.0.1", "",
             "Peak RSS added by each case (MB = 2^20 bytes) over the process after model + data setup, each case "
             "in a fresh subprocess (`resource.getrusage` ru_maxrss); float32, one thread, one batch, "
             f"median of {args.repeats} run(s).  Reproduce: `python benchmarks/bench_memory.py "
             f"--repeats {args.repeats} --out benchmarks/results_memory.md`.", ""]
    for model_name in args.models:
        results = []
        for label, lib, case, options in CASES:
            r = run_case(model_name, lib, case, options, args.repeats)
            results.append((label, lib, case, options, r))
            print(f"{model_name:4} {label:<46} {describe(lib, options):<52} {r['mb']:8.1f} MB  {r['seconds']:6.2f} s",
                  flush=True)
        n = int(results[0][4]["n"])
        ref = {(c, json.dumps(o)): r["mb"] for _, lib, c, o, r in results if lib == "curvlinops" and not o}
        lines += [f"## {model_name}: {n:,} parameters", "",
                  "| case | run | peak MB added | vs curvlinops | seconds |", "| --- | --- | ---: | ---: | ---: |"]
        for label, lib, case, options, r in results:
            peer = ref.get((case, "{}"))
            ratio = f"{r['mb'] / peer:.2f}x" if peer and lib == "ours" else ""
            lines.append(f"| {label} | {describe(lib, options)} | {r['mb']:.1f} | {ratio} | {r['seconds']:.2f} |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
