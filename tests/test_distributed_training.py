"""Sophia and the sharpness monitor under DistributedDataParallel (2 gloo processes, CPU).

Each rank trains a DDP-wrapped float64 MLP on its half of 12 examples.  Because DDP
averages equal shards' mean gradients, the run must equal single-process training on
all 12 examples: Sophia-H (probes from the same seed on every rank) to 1e-12, the
sharpness records of :class:`estimators.SharpnessMonitor` likewise, and every rank must
hold identical parameters.  Sophia-G's data-parallel GNB estimate is checked against
its definition, ``N h = N (mean_r g_r)^2`` with each rank's labels from
``rank_seed(seed, rank)``, computed here from single-process estimators.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_harness import error_of, spawn
from models import classification_data, mlp

N_EX, SHARD, STEPS = 12, 6, 5


def _data():
    return classification_data(N_EX, (5,), 3, seed=4)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _sophia_h_run(model, X, y, *, process_group=None):
    from solvers import Sophia
    from solvers.curvature_estimators import HutchinsonEstimator

    est = HutchinsonEstimator(model, nn.CrossEntropyLoss(), num_probes=2, seed=5, process_group=process_group)
    opt = Sophia(model.parameters(), lr=0.05, rho=0.1, estimator=est, update_interval=2)
    traj = []
    for _ in range(STEPS):
        F.cross_entropy(model(X), y).backward()
        opt.step(curvature_input=(X, y) if opt.needs_curvature() else None)
        opt.zero_grad()
        traj.append(_flat(model))
    return torch.stack(traj)


def _monitor_run(model, X, y, *, process_group=None):
    from estimators import SharpnessMonitor

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mon = SharpnessMonitor(model, nn.CrossEntropyLoss(), (X, y), opt, every=2, seed=0, tol=1e-8,
                           process_group=process_group)
    for _ in range(6):
        F.cross_entropy(model(X), y).backward()
        opt.step()
        opt.zero_grad()
        mon.step()
    return torch.tensor([[r.step, r.loss, r.sharpness, r.grad_norm] for r in mon.history], dtype=torch.float64)


def _training(rank: int, world: int) -> dict:
    from curvature.distributed import RankFailedError  # noqa: F401 - the class name is compared in the parent
    from solvers import Sophia
    from solvers.curvature_estimators import GNBEstimator

    group = dist.group.WORLD
    X, y = _data()
    Xr, yr = X[SHARD * rank:SHARD * (rank + 1)], y[SHARD * rank:SHARD * (rank + 1)]
    out: dict = {}
    out["sophia_h"] = _sophia_h_run(DDP(mlp(5, 6, 3, seed=3)), Xr, yr, process_group=group)

    ddp = DDP(mlp(5, 6, 3, seed=3))
    est = GNBEstimator(ddp, "ce", seed=7, max_grad_norm=0.05, process_group=group)
    out["gnb_estimate"] = torch.cat([h.reshape(-1) for h in est.estimate_tensors(Xr)])
    opt = Sophia(ddp.parameters(), lr=0.05, rho=0.1, estimator=est, update_interval=2)
    traj = []
    for _ in range(STEPS):
        F.cross_entropy(ddp(Xr), yr).backward()
        opt.step(curvature_input=Xr if opt.needs_curvature() else None)
        opt.zero_grad()
        traj.append(_flat(ddp))
    out["sophia_g"] = torch.stack(traj)

    out["ddp_without_group"] = error_of(lambda: GNBEstimator(ddp, "ce"))
    out["raising_rank"] = error_of(lambda: est.estimate_tensors(Xr if rank == 0 else Xr[:0]))
    out["after_failure"] = torch.cat([h.reshape(-1) for h in est.estimate_tensors(Xr)])  # group still usable

    out["monitor"] = _monitor_run(DDP(mlp(5, 6, 3, seed=3)), Xr, yr, process_group=group)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn("test_distributed_training", "_training", 2, tmp_path_factory.mktemp("ddp_train"))


def test_sophia_h_under_ddp_equals_single_process_and_ranks_agree(ranks):
    X, y = _data()
    single = _sophia_h_run(mlp(5, 6, 3, seed=3), X, y)
    assert torch.equal(ranks[0]["sophia_h"], ranks[1]["sophia_h"])
    torch.testing.assert_close(ranks[0]["sophia_h"], single, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(single[0], single[-1])  # it did move


def test_gnb_estimate_under_ddp_is_the_mean_gradient_squared_times_all_rows(ranks):
    from solvers.curvature_estimators import GNBEstimator, rank_seed

    X, _ = _data()
    model = mlp(5, 6, 3, seed=3)
    params = list(model.parameters())
    grads = []
    for r in range(2):
        loss, n = GNBEstimator(model, "ce", seed=rank_seed(7, r)).sampled_loss(X[SHARD * r:SHARD * (r + 1)])
        assert n == SHARD
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    g = (grads[0] + grads[1]) / 2
    g = g * min(1.0, 0.05 / (g.norm() + 1e-6))  # clipped after the reduction, as the official script
    assert g.norm() < 0.05 + 1e-12 and (grads[0] - grads[1]).norm() > 1e-3  # the clip and the streams matter
    expected = N_EX * g * g
    for out in ranks:
        torch.testing.assert_close(out["gnb_estimate"], expected, rtol=1e-12, atol=1e-15)


def test_sophia_g_under_ddp_takes_identical_steps_on_every_rank(ranks):
    assert torch.equal(ranks[0]["sophia_g"], ranks[1]["sophia_g"])
    assert not torch.allclose(ranks[0]["sophia_g"][0], ranks[0]["sophia_g"][-1])


def test_estimator_refusals_and_failures_under_ddp(ranks):
    for out in ranks:
        name, msg = out["ddp_without_group"]
        assert name == "ValueError" and "process_group" in msg
    assert ranks[1]["raising_rank"][0] == "ValueError" and "GNB needs model outputs" in ranks[1]["raising_rank"][1]
    assert ranks[0]["raising_rank"][0] == "RankFailedError" and "rank(s) [1]" in ranks[0]["raising_rank"][1]
    assert torch.equal(ranks[0]["after_failure"], ranks[1]["after_failure"])


def test_sharpness_monitor_under_ddp_equals_single_process(ranks):
    X, y = _data()
    single = _monitor_run(mlp(5, 6, 3, seed=3), X, y)
    assert single.shape[0] == 3
    assert torch.equal(ranks[0]["monitor"], ranks[1]["monitor"])
    torch.testing.assert_close(ranks[0]["monitor"][:, :2], single[:, :2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ranks[0]["monitor"][:, 2:], single[:, 2:], rtol=1e-8, atol=1e-10)
