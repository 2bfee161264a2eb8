"""Benchmark: Hessian / GGN products of curvature operators vs curvlinops 3.0.1, same model, same data.

Workloads (float32, ``torch.set_num_threads(1)``):
* ``mlp``: 784-256-256-10 tanh MLP (269,322 parameters), N=2048, cross-entropy;
* ``cnn``: Conv(1,16,5,s2)-Tanh-Conv(16,32,5,s2)-Tanh-Linear(512,10) on 28x28 inputs, N=512.

Everything is reported as a ratio to one gradient (forward + backward) measured in the
same run; medians of ``--repeats`` repeats.  "cold" = a fresh product (gradient graph
built inside the timed region: what a multi-batch loader costs per batch); "warm" =
the single-batch cached graph (what Lanczos / CG pay per call after the first).
Product-path comparisons (columns one by one reusing the graph, vmapped
``is_grads_batched``; for the GGN the double-vjp trick vs forward-mode
``jvp="forward"`` and ``torch.func.linearize``) justify the defaults.

Run:  python benchmarks/bench_operators.py --repeats 5 --out benchmarks/results_operators.md
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

import curvature

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

try:
    import curvlinops
except ImportError:  # pragma: no cover - optional peer
    curvlinops = None


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


def round_robin(fns: dict, repeats: int) -> dict:
    """Median seconds per function, timed in interleaved rounds after one warm-up round (``_harness.interleave``)."""
    return {k: H.Stats.of(ts).median for k, ts in H.interleave(fns, repeats).items()}


def forward_mode_ggn(model, loss_fn, X, y, V):
    """GGN block product with forward-mode J v (torch.func.linearize) + one vjp graph (for comparison)."""
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())

    def f(*ps):
        return torch.func.functional_call(model, dict(zip(names, ps)), (X,))

    z, jvp_fn = torch.func.linearize(f, *params)
    leaves = [p.detach().requires_grad_(True) for p in params]
    with torch.enable_grad():
        zz = torch.func.functional_call(model, dict(zip(names, leaves)), (X,))
    lam = curvature.losses.output_hessian(loss_fn, z, y, "mean")
    pieces = curvature.unflatten(V, [p.shape for p in params])
    JV = torch.stack([jvp_fn(*[t[..., j] for t in pieces]) for j in range(V.shape[1])])
    W = lam.matmat(JV)
    cols = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(zz, leaves, W[j], retain_graph=True)])
            for j in range(V.shape[1])]
    return torch.stack(cols, 1)


def bench(name, model, X, y, repeats, rows, only=None):
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    g = torch.Generator().manual_seed(2)
    v = torch.randn(n, generator=g)
    V10 = torch.randn(n, 10, generator=g)
    V16 = torch.randn(n, 16, generator=g)

    def gradient():
        torch.autograd.grad(loss_fn(model(X), y), params)

    fns, cols = {"gradient": gradient}, {"gradient": 1}

    def record(key, fn, columns=1):
        fns[key], cols[key] = fn, columns

    for label, cls in (("Hessian", curvature.HessianOperator), ("GGN", curvature.GGNOperator)):
        kw = {"jvp": "reverse"} if label == "GGN" else {}  # GGN rows: the double-vjp trick unless marked
        op = cls(model, loss_fn, (X, y), **kw)
        warm = cls(model, loss_fn, (X, y), **kw)
        opb = cls(model, loss_fn, (X, y), batched=True, **kw)

        def cold(o=op, M=v):
            o.clear_cache()
            return o @ M

        record(f"{label} product, cold", cold)
        record(f"{label} product, warm (cached graph)", lambda o=warm: o @ v)
        for k, V in ((10, V10), (16, V16)):
            record(f"{label} {k}-col block, cold (loop over columns)", lambda o=op, M=V: cold(o, M), k)
            record(f"{label} {k}-col block, cold (is_grads_batched)", lambda o=opb, M=V: cold(o, M), k)
            record(f"{label} {k}-col block, warm", lambda o=warm, M=V: o @ M, k)
            record(f"{label} {k} single cold products", lambda o=op, M=V, k=k: [cold(o, M[:, j]) for j in range(k)], k)
        if label == "Hessian":  # forward-over-reverse jvp(grad) (opt-in product path): no cached graph
            fog = cls(model, loss_fn, (X, y), product="jvp_grad")
            record("Hessian product, product='jvp_grad'", lambda o=fog: o @ v)
            record("Hessian 10-col block, product='jvp_grad'", lambda o=fog: o @ V10, 10)
        if label == "GGN":
            fwd = cls(model, loss_fn, (X, y), jvp="forward")
            fwd_warm = cls(model, loss_fn, (X, y), jvp="forward")
            record("GGN product, cold, jvp='forward'", lambda o=fwd: cold(o, v))
            record("GGN product, warm, jvp='forward'", lambda o=fwd_warm: o @ v)
            record("GGN 10-col block, cold, jvp='forward'", lambda o=fwd: cold(o, V10), 10)
            record("GGN 10-col block, torch.func.linearize", lambda: forward_mode_ggn(model, loss_fn, X, y, V10), 10)

    if curvlinops is not None:
        data = [(X, y)]
        for label, cls in (("Hessian", curvlinops.HessianLinearOperator), ("GGN", curvlinops.GGNLinearOperator)):
            cl = cls(model, loss_fn, params, data, check_deterministic=False)
            record(f"curvlinops {label} product", lambda o=cl: o @ v)
            record(f"curvlinops {label} 10-col block", lambda o=cl: o @ V10, 10)
            record(f"curvlinops {label} 16-col block", lambda o=cl: o @ V16, 16)

    if only:
        fns = {k: f for k, f in fns.items() if k == "gradient" or any(s in k for s in only)}
    med = round_robin(fns, repeats)
    t_grad = med.pop("gradient")
    res = {k: (t, cols[k]) for k, t in med.items()}
    rows.append(f"\n### {name}: {n:,} parameters, N={X.shape[0]}, float32, 1 thread\n")
    rows.append(f"One gradient (forward + backward): **{1e3 * t_grad:.1f} ms** (the unit below).\n")
    rows.append("| product | total ms | ms per column | per column / gradient |")
    rows.append("| --- | ---: | ---: | ---: |")
    for key, (t, k) in res.items():
        rows.append(f"| {key} | {1e3 * t:.1f} | {1e3 * t / k:.1f} | {t / k / t_grad:.2f}x |")
    for line in rows[-(len(res) + 4):]:
        print(line)
    return t_grad, res


def layernorm_correctness(rows) -> None:
    """Hessian-vector products on a Linear-LayerNorm-Tanh-Linear net vs central differences (float64)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    op = curvature.HessianOperator(model, loss_fn, (X, y))
    v = torch.randn(op.shape[0], generator=g, dtype=torch.float64)
    eps = 1e-5

    def grad_at(shift):
        with torch.no_grad():
            for p, d in zip(model.parameters(), op.unflatten(shift)):
                p.add_(d)
        out = op.loss_and_gradient()[1]
        with torch.no_grad():
            for p, d in zip(model.parameters(), op.unflatten(shift)):
                p.sub_(d)
        return out

    fd = (grad_at(eps * v) - grad_at(-eps * v)) / (2 * eps)
    rows.append("\n### Correctness through LayerNorm (float64, relative error of H v vs central differences)\n")
    rows.append(f"- curvature.HessianOperator: {float((op @ v - fd).norm() / fd.norm()):.1e}")
    if curvlinops is not None:
        cl = curvlinops.HessianLinearOperator(model, loss_fn, list(model.parameters()), [(X, y)],
                                              check_deterministic=False)
        rows.append(f"- curvlinops.HessianLinearOperator: {float((cl @ v - fd).norm() / fd.norm()):.1e}")
    print("\n".join(rows[-3:]))


def _peer_version() -> str:
    try:
        from importlib.metadata import version

        return version("curvlinops-for-pytorch")
    except Exception:  # noqa: BLE001 - informational only
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--out", default=None, help="write the markdown table here")
    parser.add_argument("--only", default=None,
                        help="comma-separated substrings: time only the rows containing one (and the gradient)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [
        "## Curvature operator products vs curvlinops",
        "",
        f"torch {torch.__version__}, curvlinops {_peer_version()}; "
        f"medians of {args.repeats} repeats; command: "
        f"`python benchmarks/bench_operators.py --repeats {args.repeats} --out benchmarks/results_operators.md`",
    ]
    builders = {"mlp": ("MLP 784-256-256-10 tanh", make_mlp), "cnn": ("CNN 2 conv + linear", make_cnn)}
    for key in args.models.split(","):
        title, build = builders[key]
        model, X, y = build()
        bench(title, model, X, y, args.repeats, rows, args.only.split(",") if args.only else None)
    layernorm_correctness(rows)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
