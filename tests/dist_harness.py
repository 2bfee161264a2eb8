"""Spawning a small gloo group on 127.0.0.1 for the data-parallel tests.

``spawn(module, function, world, tmp_path)`` starts ``world`` processes that each join
one gloo group (every collective bounded by ``GLOO_TIMEOUT_S``), call
``module.function(rank, world)`` and save its dict; the parent joins them within
``JOIN_TIMEOUT_S`` (killing them otherwise) and returns the dicts in rank order.
"""

from __future__ import annotations

import importlib
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GLOO_TIMEOUT_S = 20.0
JOIN_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, module: str, name: str, outdir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=GLOO_TIMEOUT_S))
    out = getattr(importlib.import_module(module), name)(rank, world)
    torch.save(out, Path(outdir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def spawn(module: str, name: str, world: int, tmp_path: Path) -> list[dict]:
    ctx = mp.start_processes(_entry, args=(world, free_port(), module, name, str(tmp_path)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{name}: the {world} processes did not finish within {JOIN_TIMEOUT_S} s")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def error_of(fn) -> tuple[str, str]:
    """``(exception class name, message)`` of ``fn()``, which is expected to raise."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test records what was raised
        return type(e).__name__, str(e)
    return "nothing raised", ""
