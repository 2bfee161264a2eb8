"""A DDP training run whose sharpness is monitored on the whole (sharded) training set.

    torchrun --nproc_per_node=2 examples/distributed_monitored_training.py [--out sharpness_ddp.csv]

Full-batch gradient descent under ``DistributedDataParallel`` (every rank its shard;
DDP averages the gradients, so the shards have equal size here), and a
``SharpnessMonitor`` built with ``process_group=WORLD``: every measurement (loss,
gradient norm, top Hessian eigenvalue by Lanczos) is of the whole training set and
identical on every rank, so any decision taken from it (stop, lower the learning
rate) is taken by all ranks alike.  Rank 0 writes the CSV.
"""

from __future__ import annotations

import argparse
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import estimators
from curvature.distributed import is_rank_zero, shard_indices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--out", default="sharpness_ddp.csv")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    world = dist.get_world_size()
    n = 256 * world  # equal shards: DDP's gradient average is then the full-batch gradient
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)
    idx = shard_indices(n)
    shard = (X[idx.start:idx.stop], y[idx.start:idx.stop])
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3)))
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    monitor = estimators.SharpnessMonitor(model, loss_fn, shard, opt, every=10, process_group=dist.group.WORLD)
    for step in range(args.steps):
        opt.zero_grad()
        loss = loss_fn(model(*shard[:1]), shard[1])
        loss.backward()
        opt.step()
        record = monitor.step(step)
        if record is not None and is_rank_zero():
            print(f"step {step:3d}  loss {record.loss:.4f}  sharpness {record.sharpness:.3f}  "
                  f"2/lr {record.threshold:.2f}")
    if is_rank_zero():
        monitor.to_csv(args.out)
        print(f"wrote {args.out}; edge-of-stability onset: {monitor.eos_onset}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
