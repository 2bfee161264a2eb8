"""Benchmark: data-parallel curvature products, 1 vs 2 processes (gloo, CPU), same data set.

Workload (float32, one intra-op thread per process): 784-256-256-10 tanh MLP (269,322
parameters), N=2048 examples in batches of 256, cross-entropy; products of the
Hessian (one column and an 8-column block) and of the GGN (one column).

Both configurations run inside one 2-process job, interleaved round by round so that
they see the same machine load: in each round rank 0 first computes the product on
the whole data set alone (``process_group=None``; rank 1 waits in a barrier), then
both ranks compute it on their halves (``process_group=WORLD``).  Reported: medians of
``--repeats`` rounds, speed-up ``t1 / t2`` and efficiency ``speed-up / 2``; the bytes
passed to ``all_reduce`` per product (counted by wrapping ``torch.distributed.all_reduce``
in this script) and the construction's ``all_gather``.

Run:  python benchmarks/bench_distributed.py --repeats 5 --out benchmarks/results_distributed.md
      python benchmarks/bench_distributed.py --fd-error   (finite-difference error table)
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

N, BATCH = 2048, 256


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(N, 784, generator=g), torch.randint(0, 10, (N,), generator=g)
    return model, [(X[i:i + BATCH], y[i:i + BATCH]) for i in range(0, N, BATCH)]


def _worker(rank: int, world: int, port: int, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    import curvature

    counted = {"bytes": 0, "calls": 0}
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        counted["bytes"] += tensor.numel() * tensor.element_size()
        counted["calls"] += 1
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    model, batches = _problem()
    shard = batches[rank::world]
    n = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(2)
    V1, V8 = torch.randn(n, 1, generator=g), torch.randn(n, 8, generator=g)
    cases = [("Hessian product (1 column)", curvature.HessianOperator, V1),
             ("Hessian 8-column block", curvature.HessianOperator, V8),
             ("GGN product (1 column)", curvature.GGNOperator, V1)]
    loss_fn = nn.CrossEntropyLoss()
    single = {name: cls(model, loss_fn, batches) for name, cls, _ in cases} if rank == 0 else {}
    t0 = time.perf_counter()
    parallel = {name: cls(model, loss_fn, shard, process_group=dist.group.WORLD) for name, cls, _ in cases}
    build_s = time.perf_counter() - t0
    times = {name: {"1 process": [], "2 processes": []} for name, _, _ in cases}
    traffic = {}
    for _ in range(repeats):
        for name, _, V in cases:
            dist.barrier()
            if rank == 0:
                t0 = time.perf_counter()
                single[name] @ V
                times[name]["1 process"].append(time.perf_counter() - t0)
            dist.barrier()
            before = dict(counted)
            t0 = time.perf_counter()
            parallel[name] @ V
            times[name]["2 processes"].append(time.perf_counter() - t0)
            traffic[name] = (counted["bytes"] - before["bytes"], counted["calls"] - before["calls"])
    if rank == 0:
        torch.save({"times": times, "traffic": traffic, "n": n, "build_s": build_s}, Path(out) / "bench.pt")
    dist.destroy_process_group()


def fd_error_table() -> str:
    """Relative error of the finite-difference product vs double backward in float64, per dtype."""
    import copy
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import curvature
    from models import classification_data, cnn, mlp

    rows = ["| model | dtype | eps^(2/3) | relative error (4 columns) | error / eps^(2/3) |",
            "| --- | --- | ---: | --- | ---: |"]
    for name, make, shape in [("mlp", lambda: mlp(5, 6, 3, seed=3), (5,)), ("cnn", lambda: cnn(seed=1), (1, 7, 7))]:
        X, y = classification_data(16, shape, 3, seed=4)
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            model = make().to(dtype)
            n = sum(p.numel() for p in model.parameters())
            V = torch.randn(n, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
            exact = curvature.HessianOperator(copy.deepcopy(model).double(), nn.CrossEntropyLoss(),
                                              (X.double(), y)) @ V.double()
            fd = (curvature.FiniteDifferenceHessianOperator(model, nn.CrossEntropyLoss(), (X.to(dtype), y)) @ V)
            rel = (fd.double() - exact).norm(dim=0) / exact.norm(dim=0)
            e = torch.finfo(dtype).eps ** (2 / 3)
            rows.append(f"| {name} | {str(dtype).replace('torch.', '')} | {e:.1e} | {float(rel.min()):.1e} - "
                        f"{float(rel.max()):.1e} | {float(rel.max()) / e:.2f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--fd-error", action="store_true", help="print the finite-difference error table only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.fd_error:
        print(fd_error_table())
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, port, args.repeats, tmp), nprocs=2)
        res = torch.load(Path(tmp) / "bench.pt")
    load = os.getloadavg()[0]
    lines = [
        "## Data-parallel products: 1 vs 2 processes (gloo, CPU)",
        "",
        f"torch {torch.__version__}; MLP 784-256-256-10 tanh ({res['n']:,} parameters), N={N} in batches of "
        f"{BATCH}, float32, 1 thread per process, {os.cpu_count()} cores; medians of {args.repeats} interleaved "
        f"rounds; load average {load:.1f} at the end of the run (the machine is shared); command: "
        "`python benchmarks/bench_distributed.py --repeats "
        f"{args.repeats} --out benchmarks/results_distributed.md`",
        "",
        "| product | 1 process ms | 2 processes ms | speed-up | efficiency | all_reduce bytes / product (calls) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, t in res["times"].items():
        t1, t2 = statistics.median(t["1 process"]), statistics.median(t["2 processes"])
        b, c = res["traffic"][name]
        lines.append(f"| {name} | {1e3 * t1:.1f} | {1e3 * t2:.1f} | {t1 / t2:.2f}x | {t1 / t2 / 2:.0%} | "
                     f"{b:,} ({c}) |")
    lines += ["", f"Construction of the 3 data-parallel operators (scan of the shard + one all_gather of "
              f"12 float64 per rank each): {1e3 * res['build_s']:.0f} ms in all.", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
