"""Sharpness tracking cost: SharpnessMonitor (warm-started Lanczos) vs the EoS code's eigsh.

The edge-of-stability reference code (locuslab/edge-of-stability, ``src/utilities.py``)
measures sharpness every ``eig_freq`` steps with ``scipy.sparse.linalg.eigsh`` on a
Hessian-vector-product ``LinearOperator``, from scratch each time, ARPACK defaults
(``tol=0``, i.e. machine precision; ``which`` left at its default ``'LM'``).  Here
every method measures the same parameter snapshots (taken every ``every`` steps of
one full-batch GD run that is at the edge of stability) on the same
``curvature.HessianOperator``:

* ``monitor``      -- SharpnessMonitor: Lanczos warm-started from the previous
  eigenvectors, ``tol=1e-4`` (plus one gradient per measurement for loss/grad norm);
* ``lanczos cold`` -- the same solver without warm start (random start each time);
* ``eigsh LM``     -- the reference code's call: ``eigsh(op, k, which='LM')``, from scratch;
* ``eigsh LA``     -- the same with ``which='LA'`` (what it should be);
* ``eigsh LA warm tol=1e-4`` -- the best scipy can do: previous top vector as ``v0``.

Reported per method: Hessian-vector products per measurement (median), time per
measurement (median), the largest deviation from the ``eigsh LA`` value.  Then the
monitor's overhead on training: wall time of GD with the monitor measuring every
``every`` steps vs without, as a fraction of training time (median of repeats).

    python benchmarks/bench_sharpness.py            # both workloads, ~minutes
    python benchmarks/bench_sharpness.py --quick    # smaller
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import numpy as np
import scipy.sparse.linalg
import torch
from torch import nn

import curvature
from estimators import SharpnessMonitor
from estimators.eos import HalfMSELoss, chebyshev_data, tanh_regression_net


def workload_tanh(seed=0):
    """The EoS code's toy: 1-100-1 tanh net, 20 Chebyshev points, lr 0.4 (EoS after ~150 steps)."""
    return tanh_regression_net(seed=seed), HalfMSELoss(), chebyshev_data(), 0.4


def workload_fc(seed=0, n=500, d=32, width=200, classes=10):
    """fc-tanh (two hidden layers of 200, as the EoS code's fc-tanh) on synthetic data, MSE on one-hot."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    W = torch.randn(d, classes, generator=g, dtype=torch.float64)
    labels = (X @ W + 0.5 * torch.randn(n, classes, generator=g, dtype=torch.float64)).argmax(1)
    Y = nn.functional.one_hot(labels, classes).to(torch.float64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                            nn.Linear(width, classes)).to(torch.float64)

    def loss_fn(z, y):  # the EoS code's MSE: 1/2 ||z - y||^2 summed over classes, mean over examples
        return 0.5 * ((z - y) ** 2).sum(1).mean()

    loss_fn.reduction = "mean"
    return net, loss_fn, (X, Y), 0.5


def gd_snapshots(model, loss_fn, data, lr, steps, every, monitor_kwargs):
    """Run GD with the monitor; return the monitor and the parameter snapshots it measured."""
    X, y = data
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    mon = SharpnessMonitor(model, loss_fn, data, opt, every=every, **monitor_kwargs)
    snaps = []
    for t in range(steps + 1):
        if t % every == 0:
            snaps.append(copy.deepcopy(model.state_dict()))
        mon.step(t)
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    return mon, snaps


def time_training(model, loss_fn, data, lr, steps, every, monitor: bool, k: int):
    X, y = data
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    mon = SharpnessMonitor(model, loss_fn, data, opt, every=every, k=k) if monitor else None
    t0 = time.perf_counter()
    for t in range(steps + 1):
        if mon is not None:
            mon.step(t)
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    return time.perf_counter() - t0


def eigsh_measure(op, k, which, tol=0.0, v0=None):
    before = op.num_matvecs
    t0 = time.perf_counter()
    vals, vecs = scipy.sparse.linalg.eigsh(op.to_scipy(), k=k, which=which, tol=tol, v0=v0)
    secs = time.perf_counter() - t0
    order = np.argsort(vals)[::-1]
    return float(vals[order[0]]), op.num_matvecs - before, secs, vecs[:, order[0]]


def _log(msg):
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bench(name, make, steps, every, k, repeats):
    model0, loss_fn, data, lr = make()
    _log(f"{name}, k={k}: monitor run")
    rows = {}
    # 1) monitor (warm) on a live run, keeping the snapshots it measured
    mon, snaps = gd_snapshots(copy.deepcopy(model0), loss_fn, data, lr, steps, every, {"k": k})
    rows["monitor (warm Lanczos, tol 1e-4)"] = ([r.num_matvecs for r in mon.history],
                                                [r.seconds for r in mon.history],
                                                [r.sharpness for r in mon.history])
    cold = copy.deepcopy(model0)
    ops = []
    for s in snaps:
        m = copy.deepcopy(cold)
        m.load_state_dict(s)
        ops.append((m, curvature.HessianOperator(m, loss_fn, data)))
    from estimators.sharpness import sharpness

    mv, sec, val = [], [], []
    for i, (m, op) in enumerate(ops):
        t0 = time.perf_counter()
        r = sharpness(op, k=k, tol=1e-4, seed=i)
        sec.append(time.perf_counter() - t0)
        mv.append(r.num_matvecs)
        val.append(r.value)
        op.clear_cache()
    rows["lanczos cold (tol 1e-4)"] = (mv, sec, val)
    _log("eigsh")
    for which in ("LM", "LA"):
        mv, sec, val = [], [], []
        for m, op in ops:
            v, n_mv, s, _ = eigsh_measure(op, k, which)
            mv.append(n_mv)
            sec.append(s)
            val.append(v)
            op.clear_cache()
        rows[f"eigsh {which} from scratch (EoS code, tol=0)"] = (mv, sec, val)
    mv, sec, val = [], [], []
    v0 = None
    for m, op in ops:
        v, n_mv, s, vec = eigsh_measure(op, k, "LA", tol=1e-4, v0=v0)
        v0 = vec
        mv.append(n_mv)
        sec.append(s)
        val.append(v)
        op.clear_cache()
    rows["eigsh LA warm v0, tol 1e-4"] = (mv, sec, val)
    ref = rows["eigsh LA from scratch (EoS code, tol=0)"][2]
    _log("overhead")
    # 2) overhead on training time (repeats, medians)
    base, with_mon = [], []
    for _ in range(repeats):
        base.append(time_training(model0, loss_fn, data, lr, steps, every, False, k))
        with_mon.append(time_training(model0, loss_fn, data, lr, steps, every, True, k))
    n = sum(p.numel() for p in model0.parameters())
    thr = 2 / lr
    ratios = [s / thr for s in ref]
    return {"name": name, "n": n, "lr": lr, "steps": steps, "every": every, "k": k, "rows": rows, "ref": ref,
            "base": statistics.median(base), "with": statistics.median(with_mon),
            "max_ratio": max(ratios), "measurements": len(ref)}


def report(res) -> str:
    lines = [f"### {res['name']} (n = {res['n']} parameters, GD lr = {res['lr']}, {res['steps']} steps, "
             f"measure every {res['every']} -> {res['measurements']} measurements, k = {res['k']}; "
             f"max sharpness/(2/lr) = {res['max_ratio']:.2f})", "",
             "| method | HVPs / measurement (median) | mean | time / measurement (median) | "
             "max abs dev. from eigsh LA |", "|---|---|---|---|---|"]
    base_mv = statistics.median(res["rows"]["eigsh LM from scratch (EoS code, tol=0)"][0])
    for key, (mv, sec, val) in res["rows"].items():
        dev = max(abs(a - b) for a, b in zip(val, res["ref"]))
        lines.append(f"| {key} | {statistics.median(mv):.0f} ({base_mv / max(statistics.median(mv), 1):.1f}x "
                     f"fewer than eigsh LM) | {statistics.mean(mv):.1f} | {1e3 * statistics.median(sec):.1f} ms "
                     f"| {dev:.1e} |")
    ov = (res["with"] - res["base"]) / res["base"]
    lm_sec = res["rows"]["eigsh LM from scratch (EoS code, tol=0)"][1]
    ov_lm = sum(lm_sec) / res["base"]
    lines += ["", f"Training {res['steps']} GD steps: {res['base']:.2f} s without the monitor, {res['with']:.2f} s "
              f"with it (every {res['every']} steps) -> monitor overhead {100 * ov:.0f} % of training time "
              "(including one full-data gradient per measurement for loss and gradient norm); the EoS code's "
              f"eigsh LM at the same frequency would add {100 * ov_lm:.0f} % (sum of its measured times).", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="write the markdown section here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    steps = 100 if args.quick else 200
    out = ["## Sharpness tracking (issue 6): SharpnessMonitor vs the EoS code's eigsh", "",
           "Command: `python benchmarks/bench_sharpness.py" + (" --quick" if args.quick else "") +
           f" --repeats {args.repeats}` (float64, CPU, `torch.set_num_threads(1)`; "
           f"torch {torch.__version__}, scipy {scipy.__version__}).", ""]
    for name, make in (("tanh 1-100-1 on Chebyshev T3 (the EoS code's toy)", workload_tanh),
                       ("fc-tanh 32-200-200-10 on 500 synthetic samples, MSE", workload_fc)):
        for k in ((1, 2) if make is workload_tanh else (1,)):
            res = bench(name, make, steps, 10, k, args.repeats)
            out.append(report(res))
            print(out[-1], flush=True)
    text = "\n".join(out)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
