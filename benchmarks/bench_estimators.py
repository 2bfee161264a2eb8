"""Benchmark: top eigenvalues, traces, Hessian blocks and spectral densities vs the peers, same workloads.

Workloads (float32, seeded; cross-entropy; one thread):

* ``mlp``: 784-256-256-10 tanh MLP (269,322 parameters), N = 2048;
* ``cnn``: Conv(1,16,5,s2)-Tanh-Conv(16,32,5,s2)-Tanh-Linear(512,10), 28x28 inputs, N = 512
  (18,378 parameters);
* ``block``: one pre-LayerNorm transformer block (4 heads, width 64, MLP 128, tanh-GELU)
  between a ``Linear(16, 64)`` embedding and a mean-pooled ``Linear(64, 10)`` head, written
  with plain-matmul attention so that every peer can differentiate it twice; 32 sequences
  of 32 tokens (34,186 parameters).

Rows (the issue's targets), each method in its own process (``--repeats`` rounds
round-robin over all cases, ``benchmarks/_harness.py``):

* ``top5`` / ``top1``: ours ``top_eigenvalues(k, tol=1e-6)`` vs scipy ``eigsh(tol=1e-3)`` on a
  plain cached-graph HVP (``autograd.grad`` on one ``create_graph`` gradient), PyHessian's
  power iteration (its default tol 1e-3), curvlinops + ``eigsh(tol=1e-3)``, and
  hessian-eigenthings' ``lanczos`` (100 steps; it has no stopping rule) when installed;
* ``trace``: 100 Rademacher probes: ours ``hutchinson_trace`` vs a plain loop on the cached
  graph, PyHessian ``trace(maxIter=100, tol=0)``, curvlinops / hessian-eigenthings Hutchinson;
* ``block``: a 10-column Hessian block ``H V``, cached graph, per column: ours vs plain torch
  (one graph, 10 second backwards);
* ``slq``: spectral density, 1 probe x 100 Lanczos steps: ours ``spectral_density`` vs
  PyHessian ``density(iter=100, n_v=1)`` and hessian-eigenthings ``spectral_density``.

Each case reports CPU seconds of its process (``--clock cpu``, the default: on the shared
2-core build machine wall clocks include waiting for a core; one thread, so CPU seconds are
an idle machine's wall clock) and the same time divided by one gradient (forward + backward)
measured in that process, products counted at the operator, the peak memory of the method
above what the process held before (``_harness.PeakMemory``) and the error against a float64
reference computed once per workload in its own process: the top-5 eigenvalues by scipy
``eigsh(tol=1e-10)`` on a float64 plain HVP (independent of this toolkit), the exact trace as
the sum of BackPACK's float64 ``DiagHessian`` (MLP, CNN; BackPACK has no attention, so the
block's trace error is against the float64 mean of the same 100 probes).  SLQ's error is its
largest node against lambda_max.  PyHessian 0.1's ``density`` calls the removed ``torch.eig``:
patched here (only here) with ``torch.linalg.eigh``.

Run:  python benchmarks/bench_estimators.py --repeats 3 --out benchmarks/results_estimators.md
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import sys

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

SCRIPT = os.path.abspath(__file__)
PEERS = {"pyhessian": "PyHessian 0.1", "curvlinops": "curvlinops 3.0.1", "hessian_eigenthings": "hessian-eigenthings"}


# ----------------------------------------------------------------------------- workloads
def make_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(2048, 784, generator=g), torch.randint(0, 10, (2048,), generator=g)


def make_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 5, stride=2), nn.Tanh(), nn.Conv2d(16, 32, 5, stride=2), nn.Tanh(),
                          nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(512, 1, 28, 28, generator=g), torch.randint(0, 10, (512,), generator=g)


class Block(nn.Module):
    """Embedding, one pre-LN transformer block (plain-matmul attention), mean pool, linear head."""

    def __init__(self, d_in: int = 16, width: int = 64, heads: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(d_in, width)
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(approximate="tanh"), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = self.embed(x)
        B, T, D = h.shape
        q, k, v = self.qkv(self.ln1(h)).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // self.heads), dim=-1)
        h = h + self.proj((att @ v).transpose(1, 2).reshape(B, T, D))
        h = h + self.mlp(self.ln2(h))
        return self.head(h.mean(1))


def make_block():
    torch.manual_seed(0)
    model = Block()
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(32, 32, 16, generator=g), torch.randint(0, 10, (32,), generator=g)


WORKLOADS = {"mlp": make_mlp, "cnn": make_cnn, "block": make_block}
LOSS = nn.CrossEntropyLoss()


# ----------------------------------------------------------------------------- plain torch
class PlainHVP:
    """The baseline every user can write: one ``create_graph`` gradient, ``autograd.grad`` per product."""

    def __init__(self, model, X, y):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.sizes = [p.numel() for p in self.params]
        self.n, self.count = sum(self.sizes), 0
        self.grads = torch.autograd.grad(LOSS(model(X), y), self.params, create_graph=True)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.count += 1
        pieces = [t.view(p.shape) for t, p in zip(torch.split(v, self.sizes), self.params)]
        out = torch.autograd.grad(self.grads, self.params, grad_outputs=pieces, retain_graph=True)
        return torch.cat([o.reshape(-1) for o in out])

    def scipy(self, dtype):
        from scipy.sparse.linalg import LinearOperator

        def mv(x):
            v = torch.from_numpy(np.ascontiguousarray(x).reshape(-1)).to(dtype)
            return self(v).detach().numpy().astype(x.dtype)

        return LinearOperator((self.n, self.n), matvec=mv, dtype=np.float64 if dtype == torch.float64 else np.float32)


def rademacher(n, count, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (count, n), generator=g) * 2 - 1).float()


# ----------------------------------------------------------------------------- peers
def pyhessian(model, X, y):
    """PyHessian's ``hessian`` object and a product counter (its module-level HVP wrapped)."""
    import pyhessian  # noqa: F401
    ph = sys.modules["pyhessian.hessian"]
    counter = {"n": 0}
    orig = ph.hessian_vector_product

    def counted(gradsH, params, v):
        counter["n"] += 1
        return orig(gradsH, params, v)

    ph.hessian_vector_product = counted

    def eig(T, eigenvectors=True):  # the removed torch.eig, for PyHessian's symmetric tridiagonal T
        lam, V = torch.linalg.eigh(T)
        return torch.stack([lam, torch.zeros_like(lam)], dim=1), V

    torch.eig = eig
    return ph.hessian(model, LOSS, data=(X, y), cuda=False), counter


def curvlinops_op(model, X, y):
    from curvlinops import HessianLinearOperator

    return HessianLinearOperator(model, LOSS, [p for p in model.parameters() if p.requires_grad], [(X, y)],
                                 check_deterministic=False)


class CountingScipy:
    def __init__(self, sop):
        from scipy.sparse.linalg import LinearOperator

        self.n = 0

        def mv(x):
            self.n += 1
            return sop.matvec(x)

        self.op = LinearOperator(sop.shape, matvec=mv, dtype=sop.dtype)


class CountingTorchOp:
    """A curvlinops torch operator whose ``@`` counts columns."""

    def __init__(self, op):
        self.op, self.n = op, 0
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device

    def __matmul__(self, X):
        self.n += 1 if X.dim() == 1 else X.shape[1]
        return self.op @ X


def eigenthings_op(model, X, y):
    import hessian_eigenthings as he

    op = he.HessianOperator(model, [(X, y)], he.supervised_loss(LOSS))
    counter = {"n": 0}
    orig = op.matvec

    def counted(v):
        counter["n"] += 1
        return orig(v)

    op.matvec = counted
    return op, counter


# ----------------------------------------------------------------------------- one case
def gradient_seconds(model, X, y, timer, repeats=3):
    params = list(model.parameters())

    def grad():
        torch.autograd.grad(LOSS(model(X), y), params)

    return H.Stats.of(H.interleave({"g": grad}, repeats, timer=timer)["g"]).median


def run_method(task, method, model, X, y):
    """``(values, products)`` of one method on one task; ``values``: eigenvalues / trace / top node."""
    import curvature
    import estimators

    k = {"top5": 5, "top1": 1}.get(task)
    if method == "ours":
        op = curvature.HessianOperator(model, LOSS, (X, y))
        if k:
            r = estimators.top_eigenvalues(op, k, tol=1e-6, seed=0)
            return r.eigenvalues.tolist(), op.num_matvecs
        if task == "trace":
            r = estimators.hutchinson_trace(op, 100, seed=0)
            return [float(r.estimate)], op.num_matvecs
        if task == "block":
            V = torch.randn(op.shape[0], 10, generator=torch.Generator().manual_seed(0))
            op @ V[:, :1]  # build the cached graph outside the count (the plain loop builds it in setup)
            op.reset_num_matvecs()
            return [float((op @ V).norm())], op.num_matvecs
        d = estimators.spectral_density(op, num_probes=1, num_steps=100, seed=0)
        return [float(d.nodes.max())], op.num_matvecs
    if method == "plain":  # the cached-graph HVP written by hand
        hvp = PlainHVP(model, X, y)
        if k:
            from scipy.sparse.linalg import eigsh

            vals = eigsh(hvp.scipy(torch.float32), k=k, which="LA", tol=1e-3, return_eigenvectors=False)
            return sorted(vals.tolist(), reverse=True), hvp.count
        if task == "trace":
            probes = rademacher(hvp.n, 100)
            return [float(sum(float(v @ hvp(v)) for v in probes) / 100)], hvp.count
        if task == "block":
            V = torch.randn(hvp.n, 10, generator=torch.Generator().manual_seed(0))
            Vt = V.T.contiguous()
            return [float(torch.stack([hvp(Vt[c]) for c in range(10)], 1).norm())], hvp.count
    if method == "pyhessian":
        Hs, c = pyhessian(model, X, y)
        if k:
            ev, _ = Hs.eigenvalues(top_n=k)
            return sorted(ev, reverse=True), c["n"]
        if task == "trace":
            return [float(np.mean(Hs.trace(maxIter=100, tol=0.0)))], c["n"]
        eig, _ = Hs.density(iter=100, n_v=1)
        return [float(max(eig[0]))], c["n"]
    if method == "curvlinops":
        Hc = curvlinops_op(model, X, y)
        if k:
            from scipy.sparse.linalg import eigsh

            s = CountingScipy(Hc.to_scipy())
            vals = eigsh(s.op, k=k, which="LA", tol=1e-3, return_eigenvectors=False)
            return sorted(vals.tolist(), reverse=True), s.n
        from curvlinops import hutchinson_trace

        Hcount = CountingTorchOp(Hc)
        torch.manual_seed(0)
        return [float(hutchinson_trace(Hcount, 100))], Hcount.n
    if method == "eigenthings":
        import hessian_eigenthings as he

        op, c = eigenthings_op(model, X, y)
        if k:
            r = he.lanczos(op, k=k, max_iter=100, tol=1e-3, which="LA", seed=0)
            return sorted(r.eigenvalues.tolist(), reverse=True), c["n"]
        if task == "trace":
            return [float(he.hutchinson(op, num_samples=100, seed=0).estimate)], c["n"]
        d = he.spectral_density(op, num_runs=1, lanczos_steps=100, seed=0)
        return [float(np.nanmax(d.raw_eigenvalues.numpy()))], c["n"]
    raise ValueError(f"no method {method!r} for task {task!r}")


def reference(workload):
    """Float64 truth: top-5 by scipy eigsh(1e-10) on a plain HVP; exact trace (BackPACK) or same-probe mean."""
    from scipy.sparse.linalg import eigsh

    model, X, y = WORKLOADS[workload]()
    m64, X64 = copy.deepcopy(model).double(), X.double()
    hvp = PlainHVP(m64, X64, y)
    top5 = sorted(eigsh(hvp.scipy(torch.float64), k=5, which="LA", tol=1e-10,
                        return_eigenvectors=False).tolist(), reverse=True)
    probes = rademacher(hvp.n, 100).double()
    probe_mean = float(sum(float(v @ hvp(v)) for v in probes) / 100)
    if workload == "block":
        return {"top5": top5, "trace": probe_mean, "trace_kind": "float64 mean of the same 100 probes"}
    from backpack import backpack, extend
    from backpack.extensions import DiagHessian

    mb, loss_fn, total = extend(copy.deepcopy(m64)), extend(nn.CrossEntropyLoss()), 0.0
    for start in range(0, X.shape[0], 16):  # DiagHessian of a conv layer is memory-hungry: small chunks
        Xc, yc = X64[start:start + 16], y[start:start + 16]
        with backpack(DiagHessian()):
            loss_fn(mb(Xc), yc).backward()
        total += float(sum(p.diag_h.sum() for p in mb.parameters())) * Xc.shape[0] / X.shape[0]
        mb.zero_grad()
    return {"top5": top5, "trace": total, "trace_kind": "exact (BackPACK DiagHessian, float64)",
            "probe_mean": probe_mean}


def run_case(case: dict) -> dict:
    H.one_thread()
    if case["task"] == "reference":
        return reference(case["workload"])
    timer = H.clock(case["clock"])
    model, X, y = WORKLOADS[case["workload"]]()
    t_grad = gradient_seconds(model, X, y, timer)
    with H.PeakMemory() as mem:
        (values, products), seconds = H.timed(lambda: run_method(case["task"], case["method"], model, X, y), timer)
    return {"seconds": seconds, "t_grad": t_grad, "products": products, "values": values, "peak_mib": mem.mib}


# ----------------------------------------------------------------------------- the table
METHODS = {  # task -> [(method, label)]
    "top5": [("ours", "ours `top_eigenvalues(tol=1e-6)`"), ("plain", "scipy `eigsh(tol=1e-3)`, cached HVP"),
             ("pyhessian", "PyHessian `eigenvalues` (tol 1e-3)"), ("curvlinops", "curvlinops + `eigsh(tol=1e-3)`"),
             ("eigenthings", "hessian-eigenthings `lanczos` (100 steps)")],
    "trace": [("ours", "ours `hutchinson_trace`"), ("plain", "plain loop, cached HVP"),
              ("pyhessian", "PyHessian `trace(maxIter=100, tol=0)`"), ("curvlinops", "curvlinops `hutchinson_trace`"),
              ("eigenthings", "hessian-eigenthings `hutchinson`")],
    "block": [("ours", "ours `H @ V`"), ("plain", "plain torch, one graph + 10 backwards")],
    "slq": [("ours", "ours `spectral_density`"), ("pyhessian", "PyHessian `density(iter=100, n_v=1)`"),
            ("eigenthings", "hessian-eigenthings `spectral_density`")],
}
METHODS["top1"] = [(m, lab) for m, lab in METHODS["top5"]]
TASK_LABEL = {"top5": "top-5 eigenvalues", "top1": "top-1 eigenvalue", "trace": "trace, 100 probes",
              "block": "Hessian block, 10 columns (per column)", "slq": "SLQ density 1 x 100"}
BASELINE = {"top5": "plain", "top1": "plain", "trace": "plain", "block": "plain", "slq": "pyhessian"}
PEER_MODULE = {"pyhessian": "pyhessian", "curvlinops": "curvlinops", "eigenthings": "hessian_eigenthings"}


def error(task, values, ref):
    if task in ("top5", "top1"):
        k = len(ref["top5"]) if task == "top5" else 1
        a, b = np.asarray(values[:k]), np.asarray(ref["top5"][:k])
        return float(np.max(np.abs(a - b) / np.abs(b))) if len(a) == k else float("nan")
    if task == "trace":
        return abs(values[0] - ref["trace"]) / abs(ref["trace"])
    if task == "slq":
        return abs(values[0] - ref["top5"][0]) / abs(ref["top5"][0])
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="rounds over all cases (one process each)")
    ap.add_argument("--workloads", default="mlp,cnn,block")
    ap.add_argument("--tasks", default="top5,top1,trace,block,slq")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per case process")
    ap.add_argument("--quick", action="store_true",
                    help="the block workload, tasks top1,trace,block,slq, 1 round (a smoke run, a few minutes)")
    H.add_case_args(ap)
    args = ap.parse_args(argv)
    if H.served_case(args, run_case):
        return 0
    if args.quick:
        args.workloads, args.tasks, args.repeats = "block", "top1,trace,block,slq", 1
    H.one_thread()  # the cases run with one thread; so does this process (and its machine line)
    workloads, tasks = args.workloads.split(","), args.tasks.split(",")
    unknown = sorted(set(workloads) - set(WORKLOADS)) + sorted(set(tasks) - set(METHODS))
    if unknown:
        ap.error(f"unknown workload/task {unknown[0]!r}; workloads {sorted(WORKLOADS)}, tasks {sorted(METHODS)}")
    installed = {m for m, mod in PEER_MODULE.items() if importlib.util.find_spec(mod) is not None}
    missing = sorted(set(PEER_MODULE) - installed)
    refs = {}
    for w in workloads:
        print(f"== reference {w}", flush=True)
        refs[w] = H.run_case(SCRIPT, {"task": "reference", "workload": w}, timeout=args.timeout)
        if "error" in refs[w]:
            print(f"   reference failed: {refs[w]['error']}", flush=True)
    cases = [{"workload": w, "task": t, "method": m, "clock": args.clock}
             for w in workloads for t in tasks for m, _ in METHODS[t] if m in ("ours", "plain") or m in installed]
    res = H.run_cases(SCRIPT, cases, args.repeats, timeout=args.timeout)

    rows, failed = [], []
    for w in workloads:
        ref = refs[w]
        for t in tasks:
            base = [r for r in H.ok_results(res.get(H.case_key({"workload": w, "task": t, "method": BASELINE[t],
                                                                "clock": args.clock}), []))]
            for m, label in METHODS[t]:
                key = H.case_key({"workload": w, "task": t, "method": m, "clock": args.clock})
                if key not in res:
                    continue
                rs = H.ok_results(res[key])
                if not rs:
                    failed.append(f"{w} {t} {m}: {res[key][0]['error']}")
                    rows.append([w, TASK_LABEL[t], label, "failed", "", "", "", "", ""])
                    continue
                per_col = 10 if t == "block" else 1
                sec = H.Stats.of(r["seconds"] / per_col for r in rs)
                unit = H.Stats.of(r["seconds"] / r["t_grad"] / per_col for r in rs)
                vs = (H.ratio_stats([r["seconds"] for r in rs], [r["seconds"] for r in base]).fmt(2) + "x"
                      if base and len(base) == len(rs) else "-")
                err = error(t, rs[0]["values"], ref) if "error" not in ref else None
                mem = rs[0]["peak_mib"]
                rows.append([w, TASK_LABEL[t], label, str(rs[0]["products"] // per_col if t != "block"
                                                         else rs[0]["products"]),
                             sec.fmt(3 if sec.median < 1 else 2), unit.fmt(1), vs,
                             "-" if err is None else f"{err:.1e}", "-" if mem is None else f"{mem:.0f}"])
    tbl = H.table(["workload", "task", "method", "products", "CPU s" + (" per column" if "block" in tasks else ""),
                   "/ gradient", f"/ baseline", "rel. error", "peak MiB"], rows, align="lllrrrrrr")
    notes = [f"{w}: float64 reference top-5 = {', '.join(f'{v:.6g}' for v in refs[w]['top5'])}; trace = "
             f"{refs[w]['trace']:.6g} ({refs[w]['trace_kind']})" for w in workloads if "error" not in refs[w]]
    notes += ["baseline (the `/ baseline` column, ratio per round): the plain cached-HVP method of the row's "
              "task (scipy `eigsh`, the plain probe loop, the plain block), PyHessian for SLQ; for the block, "
              "time is per column and products are the total for 10 columns",
              "medians (min-max) over rounds, each method in its own process; `/ gradient`: the method's time "
              "over one gradient (forward + backward) measured in the same process; peak MiB: resident-set "
              "peak of the method above the process's state before it (first round)"]
    if missing:
        notes.append("not installed, not run: " + ", ".join(missing))
    notes += [f"failed: {f}" for f in failed]
    cmd = (f"python benchmarks/bench_estimators.py --repeats {args.repeats} --workloads {args.workloads}"
           + (f" --tasks {args.tasks}" if args.tasks != ap.get_default("tasks") else "")
           + " --out benchmarks/results_estimators.md")
    H.write_results(args.out, "estimators", "Estimators vs the peers: eigenvalues, traces, blocks, densities "
                    f"({args.clock.upper() if args.clock == 'cpu' else 'wall'} seconds, float32)", cmd, [tbl], notes)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
