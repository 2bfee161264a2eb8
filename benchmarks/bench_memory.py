"""Benchmark: peak memory of curvature products and estimators, ours vs curvlinops 3.0.1.

Every case runs in its own subprocess (``--worker``): it builds the model and the data,
imports what it needs, records ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the
baseline), runs the case once, and reports the peak RSS minus the baseline (MB = 2^20
bytes), i.e. the memory the case added on top of the model and the data.  Float32, one
thread, one batch ``(X, y)`` (curvlinops gets ``[(X, y)]``; ``check_deterministic=False``,
so its construction runs no products), cross-entropy.

Workloads (as in bench_operators.py):
* ``mlp``: 784-256-256-10 tanh MLP (269,322 parameters), N=2048;
* ``cnn``: Conv(1,16,5,s2)-Tanh-Conv(16,32,5,s2)-Tanh-Linear(512,10) on 28x28 (18,378 parameters), N=512.

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
    ("16-col Hessian block", "ours", "hess16", {"budget_columns": 4}),
    ("16-col GGN block", "ours", "ggn16", {"micro_batch_size": 256}),
    ("top-5 eigenvalues", "ours", "top5", {"micro_batch_size": 256}),
    ("top-5 eigenvalues", "ours", "top5", {"max_basis": 20}),
    ("top-5 eigenvalues", "ours", "top5", {"basis_dtype": "float32"}),
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


def _warm_up_autograd() -> None:
    """First-call costs of torch (autograd engine, double backward, forward mode, conv kernels) before the baseline.

    They are the same for every library and would otherwise land on whichever case runs
    first in the process (each case has its own process, so: on every case).
    """
    import torch
    from torch import nn

    tiny = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3))
    x, t = torch.randn(2, 1, 4, 4), torch.tensor([0, 2])
    loss = nn.functional.cross_entropy(tiny(x), t)
    gs = torch.autograd.grad(loss, list(tiny.parameters()), create_graph=True)
    torch.autograd.grad(gs, list(tiny.parameters()), grad_outputs=[torch.ones_like(g) for g in gs])
    names = [n for n, _ in tiny.named_parameters()]
    params = tuple(p.detach() for p in tiny.parameters())
    torch.func.jvp(lambda *ps: torch.func.functional_call(tiny, dict(zip(names, ps)), (x,)), params,
                   tuple(torch.ones_like(p) for p in params))


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
    _warm_up_autograd()
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
    basis_dtype = getattr(torch, opts.pop("basis_dtype")) if "basis_dtype" in opts else None
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
            estimators.top_eigenvalues(op, 5, tol=1e-6, seed=0, max_basis=max_basis, basis_dtype=basis_dtype)
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


# glibc's default mmap threshold grows when large blocks are freed, after which freed tensors stay in
# the heap (RSS keeps them); fixed at 1 MiB, freed tensors go back to the OS and RSS tracks live memory.
MALLOC_ENVS = {"default malloc": {}, "mmap threshold 1 MiB": {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}}


def run_case(model_name, lib, case, options, repeats, env_extra):
    rows = []
    env = {**os.environ, **env_extra}
    for _ in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--worker", model_name, lib, case, json.dumps(options)],
                             capture_output=True, text=True, cwd=ROOT, env=env)
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
             "Peak RSS added by each case (MB = 2^20 bytes) over the process after model + data setup (and a "
             "warm-up of autograd on a tiny model), each case in a fresh subprocess (`resource.getrusage` "
             "ru_maxrss); float32, one thread, one batch, median of "
             f"{args.repeats} run(s).  Two allocator settings: glibc's default (what a CPU user sees; freed "
             "tensors may stay in the heap) and `MALLOC_MMAP_THRESHOLD_=1048576` (freed tensors go back to the "
             "OS, so the peak tracks live tensors, closer to what a GPU allocator reports).  Reproduce: "
             f"`python benchmarks/bench_memory.py --repeats {args.repeats} --out benchmarks/results_memory.md`.",
             ""]
    for model_name in args.models:
        results = []
        for label, lib, case, options in CASES:
            r = {name: run_case(model_name, lib, case, options, args.repeats, env)
                 for name, env in MALLOC_ENVS.items()}
            results.append((label, lib, case, options, r))
            print(f"{model_name:4} {label:<46} {describe(lib, options):<52} "
                  + "  ".join(f"{v['mb']:8.1f} MB" for v in r.values())
                  + f"  {r['default malloc']['seconds']:6.2f} s", flush=True)
        n = int(results[0][4]["default malloc"]["n"])
        ref = {c: r for _, lib, c, o, r in results if lib == "curvlinops" and not o}
        lines += [f"## {model_name}: {n:,} parameters", "",
                  "| case | run | MB, default malloc | vs curvlinops | MB, mmap threshold 1 MiB | vs curvlinops "
                  "| seconds |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for label, lib, case, options, r in results:
            cells = []
            for name in MALLOC_ENVS:
                peer = ref.get(case, {}).get(name)
                cells.append(f"{r[name]['mb']:.1f}")
                cells.append(f"{r[name]['mb'] / peer['mb']:.2f}x" if peer and lib == "ours" else "")
            lines.append(f"| {label} | {describe(lib, options)} | " + " | ".join(cells)
                         + f" | {r['default malloc']['seconds']:.2f} |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
