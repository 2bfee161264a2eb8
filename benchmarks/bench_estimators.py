"""Benchmark: Hessian eigenvalues, traces and spectral densities vs PyHessian 0.1 and curvlinops 3.0.1.

Workloads (float32, ``torch.set_num_threads(1)``, same factories as bench_operators.py):
* ``mlp``: 784-256-256-10 tanh MLP (269,322 parameters), N=2048 synthetic, cross-entropy;
* ``cnn``: Conv(1,16,5,s2)-Tanh-Conv(16,32,5,s2)-Tanh-Linear(512,10), 28x28 inputs, N=512.

Times are CPU seconds of this (single-threaded) process, ``time.process_time``: on
the shared 2-core machine where this was run, other jobs kept the load near 10 and
wall-clock times were inflated 3-6x and erratic; with one thread, CPU time is what an
idle machine's wall clock would show.  ``--clock wall`` uses ``time.perf_counter``.

Every method gets its own fresh model copy and operator; products are counted (ours:
``op.num_matvecs``; PyHessian: a counting wrapper around its ``hessian_vector_product``;
curvlinops: a counting wrapper around the scipy operator / torch operator).  Times are
medians of ``--repeats`` interleaved repeats.  Truth:
* eigenvalues: our Lanczos at ``tol=1e-10`` on a float64 copy of model and data,
  cross-checked with ``scipy.sparse.linalg.eigsh`` (float64, tol 1e-10);
* trace: the exact Hessian diagonal from BackPACK's ``DiagHessian`` (float64), summed.
PyHessian's ``density`` calls the removed ``torch.eig``: it is patched here (only here)
with ``torch.linalg.eigh``, which is what it means for a symmetric tridiagonal matrix.

Run:  python benchmarks/bench_estimators.py --repeats 3 --out benchmarks/results_estimators.md
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch
from torch import nn

import curvature
import estimators

CLOCK = time.process_time  # set by --clock
MAX_HUTCH = 1000  # probe cap for Hutchinson to 1 %


def make_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(2048, 784, generator=g), torch.randint(0, 10, (2048,), generator=g)
    return model, X, y


def make_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 5, stride=2), nn.Tanh(), nn.Conv2d(16, 32, 5, stride=2), nn.Tanh(),
                          nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(512, 1, 28, 28, generator=g), torch.randint(0, 10, (512,), generator=g)
    return model, X, y


# ----------------------------------------------------------------------------- truth
def reference_eigenvalues(model, X, y, k):
    m64 = copy.deepcopy(model).double()
    op = curvature.HessianOperator(m64, nn.CrossEntropyLoss(), (X.double(), y))
    res = estimators.top_eigenvalues(op, k, tol=1e-10, seed=123)
    from scipy.sparse.linalg import eigsh

    vals = eigsh(op.to_scipy(), k=k, which="LA", tol=1e-10, return_eigenvectors=False)
    ev_scipy = np.sort(vals)[::-1]
    agree = float(np.max(np.abs(res.eigenvalues.numpy() - ev_scipy) / np.abs(ev_scipy)))
    return res.eigenvalues.numpy(), agree


def reference_trace(model, X, y, chunk=16):
    """Exact trace: BackPACK's DiagHessian (float64), over chunks of the data (memory), mean-weighted."""
    from backpack import backpack, extend
    from backpack.extensions import DiagHessian

    m64 = extend(copy.deepcopy(model).double())
    loss_fn = extend(nn.CrossEntropyLoss())
    total = 0.0
    for start in range(0, X.shape[0], chunk):
        Xc, yc = X[start:start + chunk].double(), y[start:start + chunk]
        loss = loss_fn(m64(Xc), yc)
        with backpack(DiagHessian()):
            loss.backward()
        total += float(sum(p.diag_h.sum() for p in m64.parameters())) * Xc.shape[0] / X.shape[0]
    return total


# ----------------------------------------------------------------------------- peers
class _Counter:
    n = 0


def pyhessian_setup(model, X, y):
    import importlib

    ph = importlib.import_module("pyhessian.hessian")
    if not isinstance(ph, type(importlib)):  # the package re-exports the class under the same name
        import sys

        ph = sys.modules["pyhessian.hessian"]

    counter = _Counter()
    orig = ph.hessian_vector_product

    def counted(gradsH, params, v):
        counter.n += 1
        return orig(gradsH, params, v)

    ph.hessian_vector_product = counted
    def eig(T, eigenvectors=True):  # the removed torch.eig (a raising stub in torch 2.x), symmetric T
        lam, V = torch.linalg.eigh(T)
        return torch.stack([lam, torch.zeros_like(lam)], dim=1), V

    torch.eig = eig
    H = ph.hessian(copy.deepcopy(model), nn.CrossEntropyLoss(), data=(X, y), cuda=False)
    return H, counter


def curvlinops_setup(model, X, y):
    from curvlinops import HessianLinearOperator

    m = copy.deepcopy(model)
    params = [p for p in m.parameters() if p.requires_grad]
    H = HessianLinearOperator(m, nn.CrossEntropyLoss(), params, [(X, y)], check_deterministic=False)
    return H


class _CountingTorchOp:
    """Wraps a curvlinops torch operator: ``@`` counts columns."""

    def __init__(self, op):
        self.op, self.n = op, 0
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device

    def __matmul__(self, X):
        self.n += 1 if X.dim() == 1 else X.shape[1]
        return self.op @ X

    def to_scipy(self, *args, **kwargs):  # curvlinops' boundary estimates call eigsh
        from scipy.sparse.linalg import LinearOperator

        sop = self.op.to_scipy(*args, **kwargs)

        def mv(x):
            self.n += 1
            return sop.matvec(x)

        return LinearOperator(sop.shape, matvec=mv, dtype=sop.dtype)


def counting_scipy(op):
    from scipy.sparse.linalg import LinearOperator

    sop = op.to_scipy()
    counter = _Counter()

    def mv(x):
        counter.n += 1
        return sop.matvec(x)

    def mm(Xs):
        counter.n += Xs.shape[1]
        return sop.matmat(Xs)

    return LinearOperator(sop.shape, matvec=mv, matmat=mm, dtype=sop.dtype), counter


# ----------------------------------------------------------------------------- timing
def timed(fn, repeats):
    """``(result, median seconds)``: CPU time of this process (one thread), see the module doc."""
    out, ts = None, []
    for _ in range(repeats):
        t0 = CLOCK()
        out = fn()
        ts.append(CLOCK() - t0)
    return out, statistics.median(ts)


def relerr(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.abs(b)))


class _Notes(list):
    def append(self, s):  # print as we go (a late failure must not lose them)
        print("  NOTE", s, flush=True)
        super().append(s)


def bench_workload(name, factory, repeats, rows, notes, tasks=("eig", "trace", "density")):
    model, X, y = factory()
    n = sum(p.numel() for p in model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    print(f"== {name}: n = {n}")
    t0 = CLOCK()
    ref5, agree = reference_eigenvalues(model, X, y, 5)
    tr_true = reference_trace(model, X, y) if "trace" in tasks else float("nan")
    notes.append(f"{name}: reference top-5 (float64 Lanczos 1e-10) = {np.array2string(ref5, precision=6)}; "
                 f"agrees with float64 eigsh to {agree:.1e}; exact trace (BackPACK DiagHessian, float64) = "
                 f"{tr_true:.6g}; references took {CLOCK() - t0:.0f} s")

    def ours_op():
        return curvature.HessianOperator(copy.deepcopy(model), loss_fn, (X, y))

    # gradient time for the ratio column
    def grad_once():
        m = copy.deepcopy(model)
        loss = loss_fn(m(X), y)
        torch.autograd.grad(loss, list(m.parameters()))
    _, t_grad = timed(grad_once, repeats)

    def add(task, method, products, seconds, err, extra=""):
        rows.append((name, task, method, products, seconds, seconds / t_grad, err, extra))
        print(f"  {task:<22} {method:<38} {products:>6} {seconds:8.2f} s  err {err}  {extra}")

    # ---- top-k eigenvalues
    for k in ((1, 5) if "eig" in tasks else ()):
        ref = ref5[:k]

        def run_ours():
            op = ours_op()
            r = estimators.top_eigenvalues(op, k, tol=1e-6, seed=0)
            return r
        r, t = timed(run_ours, repeats)
        add(f"top-{k} eigenvalues", "ours top_eigenvalues(tol=1e-6)", r.num_matvecs, t,
            f"{relerr(r.eigenvalues.numpy(), ref):.1e}")

        def run_ours_ev():
            return estimators.top_eigenvalues(ours_op(), k, tol=1e-6, criterion="eigenvalue", seed=0)
        r, t = timed(run_ours_ev, repeats)
        add(f"top-{k} eigenvalues", "ours top_eigenvalues(tol=1e-6, criterion='eigenvalue')", r.num_matvecs, t,
            f"{relerr(r.eigenvalues.numpy(), ref):.1e}")

        def run_ph():
            H, c = pyhessian_setup(model, X, y)
            ev, _ = H.eigenvalues(top_n=k)
            return ev, c.n
        (ev, cnt), t = timed(run_ph, repeats)
        add(f"top-{k} eigenvalues", "PyHessian eigenvalues (power it., tol 1e-3)", cnt, t,
            f"{relerr(sorted(ev, reverse=True), ref):.1e}")

        def run_cl():
            from scipy.sparse.linalg import eigsh
            H = curvlinops_setup(model, X, y)
            sop, c = counting_scipy(H)
            vals = eigsh(sop, k=k, which="LA", tol=1e-6, return_eigenvectors=False)
            return np.sort(vals)[::-1], c.n
        (ev, cnt), t = timed(run_cl, repeats)
        add(f"top-{k} eigenvalues", "curvlinops + scipy eigsh(tol=1e-6)", cnt, t, f"{relerr(ev, ref):.1e}")

    if "eig" in tasks:
        warm_start(name, model, X, y, loss_fn, ours_op, notes)
    if "trace" in tasks:
        traces(name, model, X, y, ours_op, tr_true, repeats, add)
    if "density" in tasks:
        densities(model, X, y, ours_op, ref5, repeats, add)


def warm_start(name, model, X, y, loss_fn, ours_op, notes):
    """Sharpness tracking: the next operator after a small parameter step, previous vectors."""
    op = ours_op()
    prev = estimators.top_eigenvalues(op, 5, tol=1e-6, seed=0)
    m2 = copy.deepcopy(model)
    with torch.no_grad():  # one small SGD-like step
        g = torch.Generator().manual_seed(3)
        for p in m2.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g) * p.abs().mean())
    op2 = curvature.HessianOperator(m2, loss_fn, (X, y))
    cold = estimators.top_eigenvalues(op2, 5, tol=1e-6, seed=1)
    op2.reset_num_matvecs()
    warm = estimators.top_eigenvalues(op2, 5, tol=1e-6, v0=prev.eigenvectors)
    warm1 = estimators.top_eigenvalues(op2, 1, tol=1e-6, v0=prev.eigenvectors[:, 0])
    cold1 = estimators.top_eigenvalues(op2, 1, tol=1e-6, seed=1)
    notes.append(f"{name}: after a small parameter step, warm start (previous eigenvectors) takes "
                 f"{warm.num_matvecs} products for top-5 vs {cold.num_matvecs} cold; top-1 {warm1.num_matvecs} vs "
                 f"{cold1.num_matvecs}; eigenvalues agree to {relerr(warm.eigenvalues.numpy(), cold.eigenvalues.numpy()):.1e}")



def traces(name, model, X, y, ours_op, tr_true, repeats, add):
    """100 probes, and to 1% relative error."""
    def run_h100():
        return estimators.hutchinson_trace(ours_op(), 100, block_size=10, seed=0)
    r, t = timed(run_h100, repeats)
    add("trace, 100 probes", "ours hutchinson_trace", r.num_matvecs, t,
        f"{abs(float(r.estimate) - tr_true) / abs(tr_true):.1e}", f"(SE {float(r.std_error) / abs(tr_true):.1e})")

    def run_x100():
        return estimators.xtrace(ours_op(), 100, seed=0)
    r, t = timed(run_x100, repeats)
    add("trace, 100 products", "ours xtrace", r.num_matvecs, t,
        f"{abs(float(r.estimate) - tr_true) / abs(tr_true):.1e}", f"(err est {float(r.std_error) / abs(tr_true):.1e})")

    def run_ph_tr():
        H, c = pyhessian_setup(model, X, y)
        samples = H.trace(maxIter=100, tol=0.0)
        return float(np.mean(samples)), c.n
    (est, cnt), t = timed(run_ph_tr, repeats)
    add("trace, 100 probes", "PyHessian trace(maxIter=100, tol=0)", cnt, t, f"{abs(est - tr_true) / abs(tr_true):.1e}")

    def run_cl_tr():
        from curvlinops import hutchinson_trace
        H = _CountingTorchOp(curvlinops_setup(model, X, y))
        torch.manual_seed(0)
        return float(hutchinson_trace(H, 100)), H.n
    (est, cnt), t = timed(run_cl_tr, repeats)
    add("trace, 100 probes", "curvlinops hutchinson_trace", cnt, t, f"{abs(est - tr_true) / abs(tr_true):.1e}")

    # ---- trace to 1 % (by each method's own error estimate / stopping rule)
    def run_h1():
        return estimators.hutchinson_trace(ours_op(), MAX_HUTCH, rtol=0.01, block_size=10, seed=0)
    r, t = timed(run_h1, repeats)
    add("trace to 1%", "ours hutchinson_trace(rtol=0.01)", r.num_matvecs, t,
        f"{abs(float(r.estimate) - tr_true) / abs(tr_true):.1e}",
        f"(SE {float(r.std_error) / abs(tr_true):.1e}{'' if r.converged else f'; 1% SE not reached in {MAX_HUTCH}'})")

    def run_x1():
        op = ours_op()
        for m in (10, 20, 40, 80, 160, 320):
            r = estimators.xtrace(op, m, seed=0)
            if float(r.std_error) <= 0.01 * abs(float(r.estimate)):
                break
        return r, op.num_matvecs
    (r, spent), t = timed(run_x1, repeats)
    add("trace to 1%", "ours xtrace (m doubled until est. <= 1%)", spent, t,
        f"{abs(float(r.estimate) - tr_true) / abs(tr_true):.1e}", f"(last m = {r.num_matvecs})")

    def run_ph1():
        H, c = pyhessian_setup(model, X, y)
        samples = H.trace(maxIter=1000, tol=0.01)
        return float(np.mean(samples)), c.n
    (est, cnt), t = timed(run_ph1, repeats)
    add("trace to 1%", "PyHessian trace(tol=0.01)", cnt, t, f"{abs(est - tr_true) / abs(tr_true):.1e}",
        "(stops on a 1% change of the running mean)")



def densities(model, X, y, ours_op, ref5, repeats, add):
    """Spectral density: 1 probe x 100 Lanczos steps (PyHessian's defaults)."""
    def run_d():
        d = estimators.spectral_density(ours_op(), num_probes=1, num_steps=100, seed=0)
        d.evaluate()
        return d
    d, t = timed(run_d, repeats)
    top = float(d.nodes.max())
    add("density 1x100", "ours spectral_density", d.num_matvecs, t, f"{abs(top - ref5[0]) / ref5[0]:.1e}",
        "(err: top node vs lambda_max)")

    def run_ph_d():
        H, c = pyhessian_setup(model, X, y)
        eig, w = H.density(iter=100, n_v=1)
        return max(eig[0]), c.n
    (top, cnt), t = timed(run_ph_d, repeats)
    add("density 1x100", "PyHessian density(iter=100, n_v=1)", cnt, t, f"{abs(top - ref5[0]) / ref5[0]:.1e}")

    def run_cl_d():
        from curvlinops import lanczos_approximate_spectrum
        H = _CountingTorchOp(curvlinops_setup(model, X, y))
        torch.manual_seed(0)
        grid, dens = lanczos_approximate_spectrum(H, 100, num_repeats=1)
        return H.n
    cnt, t = timed(run_cl_d, repeats)
    add("density 1x100", "curvlinops lanczos_approximate_spectrum", cnt, t, "-",
        "(includes eigsh boundary estimates; no reorth.)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workloads", default="mlp,cnn")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tasks", default="eig,trace,density", help="subset of eig,trace,density")
    ap.add_argument("--out", default=None, help="markdown file to write")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    rows, notes = [], _Notes()
    for w in args.workloads.split(","):
        bench_workload(w, {"mlp": make_mlp, "cnn": make_cnn}[w], args.repeats, rows, notes, args.tasks.split(","))
    lines = ["## Estimators: eigenvalues, traces, densities (vs PyHessian 0.1, curvlinops 3.0.1)", "",
             f"Command: `python benchmarks/bench_estimators.py --repeats {args.repeats} "
             f"--workloads {args.workloads} --out benchmarks/results_estimators.md` "
             f"(torch {torch.__version__}, {args.threads} thread(s), float32, medians of {args.repeats}; "
             f"{'CPU' if args.clock == 'cpu' else 'wall-clock'} seconds).", "",
             "| workload | task | method | products | time [s] | time / gradient | rel. error | note |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.2f} | {r[5]:.0f} | {r[6]} | {r[7]} |")
    lines += ["", *[f"- {s}" for s in notes], ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
