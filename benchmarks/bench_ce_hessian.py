"""Benchmark: the softmax cross-entropy output-Hessian product at a large vocabulary.

``Lambda v`` with ``Lambda = c (diag p - p p^T)`` per token, at ``B x T x V = 8 x 64 x 50,304``
(GPT-2's padded vocabulary; float32, one thread), three ways:

* ``closed``: :class:`curvature.losses.ClosedFormOutputHessian`, what the GGN / Fisher use for
  ``nn.CrossEntropyLoss``, :class:`curvature.TokenCrossEntropyLoss` and ``F.cross_entropy``:
  ``c (r p) * (v - <p, v>)`` in one fused expression, never a ``[V, V]`` matrix;
* ``closed_before``: the expression this replaced (``p v - p <p, v>``, three ``V``-sized
  temporaries), for the before/after;
* ``autograd``: double backward through the loss
  (:class:`curvature.losses.AutogradOutputHessian`, what every other loss gets).

and the whole GGN product of an LM head (``Linear(64, 50,304)`` on ``[8, 64, 64]`` hidden
states, 3.27 M parameters, cached single batch) with the closed form vs autograd (the loss
wrapped in a lambda, which the GGN cannot recognize).

Each case runs in its own process (``--repeats`` rounds round-robin over the cases, see
``benchmarks/_harness.py``).  A case reports: the time of the first product including the
construction (softmax / the loss's gradient graph: what a fresh batch costs), the median of
``--inner`` further products (what a cached batch costs), and the peak memory of the
construction plus one product above what the process held before (the logits, ``V`` and
the targets are allocated before; resident set on CPU, allocator peak on CUDA).

Run:  python benchmarks/bench_ce_hessian.py --repeats 5 --out benchmarks/results_ce_hessian.md
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

SCRIPT = os.path.abspath(__file__)


class _ClosedBefore:
    """The previous closed form, ``c ((r p) v - (r p) <p, v>)`` (three V-sized temporaries; ``r`` = counted)."""

    def __init__(self, loss_fn, z, y):
        self.p = torch.softmax(z.detach(), dim=-1)
        counted = (y != loss_fn.ignore_index)
        self.pr = self.p * counted.unsqueeze(-1).to(z.dtype)
        self.scale = 1.0 / float(counted.sum())

    def matmat(self, V):
        pV = self.p * V
        return self.scale * (self.pr * V - self.pr * pV.sum(dim=-1, keepdim=True))


def _workload(B, T, V, device):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(B, T, V, generator=g).to(device)
    y = torch.randint(0, V, (B, T), generator=g).to(device)
    y[0, :4] = -100  # a few padding tokens
    return z, y


def run_output_case(case: dict) -> dict:
    from curvature import TokenCrossEntropyLoss
    from curvature.losses import AutogradOutputHessian, ClosedFormOutputHessian

    device = torch.device(case["device"])
    z, y = _workload(case["B"], case["T"], case["V"], device)
    Vk = torch.randn(1, *z.shape, generator=torch.Generator().manual_seed(1)).to(device)
    loss_fn = TokenCrossEntropyLoss()
    build = {"closed": lambda: ClosedFormOutputHessian(loss_fn, z, "mean", y),
             "closed_before": lambda: _ClosedBefore(loss_fn, z, y),
             "autograd": lambda: AutogradOutputHessian(loss_fn, z, y)}[case["method"]]
    with H.PeakMemory(device) as mem:
        (lam, out), t_first = H.timed(lambda: (lambda o: (o, o.matmat(Vk)))(build()))
    check = float(out.double().norm())
    del out
    times = H.interleave({"product": lambda: lam.matmat(Vk)}, case["inner"], warmup=0)["product"]
    return {"first_s": t_first, "product_s": H.Stats.of(times).median, "peak_mib": mem.mib, "norm": check}


def run_ggn_case(case: dict) -> dict:
    from curvature import GGNOperator, TokenCrossEntropyLoss

    device = torch.device(case["device"])
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Linear(case["d"], case["V"]).to(device)
    X = torch.randn(case["B"], case["T"], case["d"], generator=g).to(device)
    y = torch.randint(0, case["V"], (case["B"], case["T"]), generator=g).to(device)
    tok = TokenCrossEntropyLoss()
    loss_fn = tok if case["method"] == "closed" else (lambda z, t: tok(z, t))
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(device)
    op = GGNOperator(model, loss_fn, (X, y), reduction="mean")
    with H.PeakMemory(device) as mem:
        out, t_first = H.timed(lambda: op @ v)
    check = float(out.double().norm())
    del out
    times = H.interleave({"product": lambda: op @ v}, case["inner"], warmup=0)["product"]
    return {"first_s": t_first, "product_s": H.Stats.of(times).median, "peak_mib": mem.mib, "norm": check}


def run_case(case: dict) -> dict:
    H.one_thread(case.get("threads", 1))
    return run_ggn_case(case) if case["kind"] == "ggn" else run_output_case(case)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="rounds over the cases (one process each)")
    ap.add_argument("--inner", type=int, default=3, help="cached products timed per case process")
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="V = 8,192, 2 rounds (a smoke run)")
    H.add_case_args(ap)
    args = ap.parse_args(argv)
    if H.served_case(args, run_case):
        return 0
    if args.quick:
        args.vocab, args.repeats = 8192, 2
    H.one_thread()
    base = {"B": args.batch, "T": args.tokens, "V": args.vocab, "device": args.device, "inner": args.inner}
    methods = ["closed", "closed_before", "autograd"]
    cases = [dict(base, kind="output", method=m) for m in methods]
    cases += [dict(base, kind="ggn", method=m, d=64) for m in ("closed", "autograd")]
    res = H.run_cases(SCRIPT, cases, args.repeats)
    per = {(c["kind"], c["method"]): H.ok_results(res[H.case_key(c)]) for c in cases}

    def cell(kind, method, field, digits=3, ref=None):
        rs = per[(kind, method)]
        if not rs:
            return "failed: " + res[H.case_key(dict(base, kind=kind, method=method,
                                                    **({"d": 64} if kind == "ggn" else {})))][0]["error"]
        if ref is None:
            return H.Stats.of(r[field] for r in rs).fmt(digits)
        den = per[(kind, ref)]
        return H.ratio_stats([r[field] for r in rs], [r[field] for r in den]).fmt(2) + "x"

    notes = []
    for kind, ref in (("output", "autograd"), ("ggn", "autograd")):
        norms = {m: per[(kind, m)][0]["norm"] for m in (methods if kind == "output" else ("closed", "autograd"))
                 if per[(kind, m)]}
        if ref in norms:
            worst = max(abs(v - norms[ref]) / norms[ref] for v in norms.values())
            notes.append(f"{kind}: norms of the products agree to {worst:.1e} (relative) across methods")
    rows = []
    for kind, label in (("output", "output Hessian `Lambda v`"), ("ggn", "GGN product, LM head")):
        for m in (methods if kind == "output" else ("closed", "autograd")):
            if kind == "ggn" and m == "autograd":
                name = "autograd (loss in a lambda)"
            else:
                name = {"closed": "closed form (fused)", "closed_before": "closed form, previous expression",
                        "autograd": "double backward"}[m]
            rows.append([label, name, cell(kind, m, "first_s"), cell(kind, m, "product_s"),
                         cell(kind, m, "peak_mib", 0),
                         cell(kind, m, "product_s", ref="autograd"), cell(kind, m, "peak_mib", ref="autograd")])
    tbl = H.table(["what", "method", "first product incl. setup [s]", "cached product [s]", "peak memory [MiB]",
                   "cached product / autograd", "peak memory / autograd"], rows, align="llrrrrr")
    cmd = (f"python benchmarks/bench_ce_hessian.py --repeats {args.repeats} --vocab {args.vocab}"
           + (f" --device {args.device}" if args.device != "cpu" else "") + " --out benchmarks/results_ce_hessian.md")
    title = (f"Cross-entropy output Hessian at B x T x V = {args.batch} x {args.tokens} x {args.vocab:,} "
             f"({args.device}, float32)")
    notes.append("medians (min-max) over rounds, one process per case and round; ratios per round against "
                 "the autograd case of the same round; peak memory above the logits, V and targets "
                 f"(one V-sized tensor = {args.batch * args.tokens * args.vocab * 4 / 2**20:.0f} MiB)")
    H.write_results(args.out, "ce_hessian", title, cmd, [tbl], notes)
    return 0 if all(per.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
