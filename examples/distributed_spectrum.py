"""Spectrum of a DDP model's Hessian over a data set sharded across processes.

    torchrun --nproc_per_node=2 examples/distributed_spectrum.py [--out spectrum_ddp] [--fd]

Every rank holds its shard of the data (``shard_indices``: contiguous, unequal sizes
allowed, nothing padded), builds the same operator with ``process_group=WORLD`` and
gets the numbers of the whole data set -- identical on every rank; rank 0 alone writes
``--out``.  ``--fd`` uses the finite-difference Hessian (two gradient passes per
product; for models without double backward, e.g. FSDP-sharded ones).  Backend: NCCL
when CUDA is available, gloo otherwise.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Subset, TensorDataset

import curvature
import estimators
from curvature.distributed import is_rank_zero, shard_indices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="spectrum_ddp")
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--fd", action="store_true", help="finite-difference Hessian products")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=120))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    g = torch.Generator().manual_seed(0)  # the same data set on every rank; each keeps its shard
    X, y = torch.randn(args.examples, 20, generator=g), torch.randint(0, 5, (args.examples,), generator=g)
    dataset = TensorDataset(X, y)
    loader = DataLoader(Subset(dataset, shard_indices(len(dataset))), batch_size=128)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 5)).to(device)
    ddp = DDP(model, device_ids=[device.index] if cuda else None)

    loss_fn, group = nn.CrossEntropyLoss(), dist.group.WORLD
    if args.fd:
        H = curvature.FiniteDifferenceHessianOperator(ddp, loss_fn, loader, process_group=group)
        top = estimators.top_eigenvalues(H, k=3, seed=0, tol=1e-4)
        text = f"top eigenvalues (finite differences): {[round(float(v), 6) for v in top.eigenvalues]}"
        if is_rank_zero():
            print(text)
    else:
        report = estimators.spectrum_report(ddp, loss_fn, loader, process_group=group, top_k=3, num_probes=30,
                                            slq_probes=4, lanczos_steps=40, out_dir=args.out, progress=False)
        if is_rank_zero():
            print(report.summary())
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
