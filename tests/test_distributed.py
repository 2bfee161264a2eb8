"""Data-parallel operators and estimators on torch.distributed (gloo, CPU, 127.0.0.1).

Each test spawns 2 or 3 processes (``torch.multiprocessing``, a free port, a bounded
join) that each hold a shard of one data set -- unequal sizes, one of them empty --
and save what they computed; the parent compares with the single-process operator on
the whole data set and with dense double-backward truth.  One spawn per world size
runs a battery of checks, because starting processes is the expensive part.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import curvature
import estimators
from curvature import distributed as cdist
from dense_truth import dense_ggn, dense_hessian
from models import classification_data, mlp

GLOO_TIMEOUT_S = 20.0  # every collective of the tests is bounded by this
JOIN_TIMEOUT_S = 120.0


# ------------------------------------------------------------------------------ harness
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, name: str, outdir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    os.environ["CURVATURE_TEST_OUT"] = outdir
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=GLOO_TIMEOUT_S))
    out = globals()[name](rank, world)
    torch.save(out, Path(outdir) / f"rank{rank}.pt")
    if out.get("_abandon_group"):  # a group left broken on purpose: do not wait for it
        os._exit(0)
    dist.destroy_process_group()


def _spawn(name: str, world: int, tmp_path: Path) -> list[dict]:
    ctx = mp.start_processes(_entry, args=(world, _free_port(), name, str(tmp_path)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{name}: the {world} processes did not finish within {JOIN_TIMEOUT_S} s")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _error(fn) -> tuple[str, str, float]:
    """``(exception class, message, seconds)`` of ``fn()``, which must raise."""
    t0 = time.monotonic()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test records what was raised
        return type(e).__name__, str(e), time.monotonic() - t0
    return "nothing raised", "", time.monotonic() - t0


# --------------------------------------------------------------------------- the problem
N_CLASSES = 3


def _problem():
    model = mlp(5, 6, N_CLASSES, seed=3)
    X, y = classification_data(12, (5,), N_CLASSES, seed=4)
    y = y.clone()
    y[[1, 6, 7]] = -100  # token-level style: ignored targets, unevenly spread over the shards
    batches = [(X[0:4], y[0:4]), (X[4:6], y[4:6]), (X[6:11], y[6:11]), (X[11:12], y[11:12])]
    return model, X, y, batches


def _probe_block(n: int) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _shards(rank: int, world: int, batches):
    """3 ranks: [b0, b1], [b2, b3], [] (empty); 2 ranks: [b0], [b1, b2, b3]."""
    if world == 3:
        return [batches[0:2], batches[2:4], []][rank]
    return [batches[0:1], batches[1:4]][rank]


def _single_shards(rank: int, world: int, X, y):
    """One batch (X, y) per rank: 7, 5 and 0 examples (3 ranks) or 3 and 9 (2 ranks)."""
    cuts = [0, 7, 12, 12] if world == 3 else [0, 3, 12]
    return X[cuts[rank]:cuts[rank + 1]], y[cuts[rank]:cuts[rank + 1]]


class _Flaky(nn.Module):
    """Wraps a model; raises in forward on rank ``bad_rank`` once ``armed``."""

    def __init__(self, inner: nn.Module, bad_rank: int) -> None:
        super().__init__()
        self.inner, self.bad_rank, self.armed = inner, bad_rank, False

    def forward(self, x):
        if self.armed and dist.get_rank() == self.bad_rank:
            raise ValueError("boom: a broken batch on this rank")
        return self.inner(x)


def _labelled(data):
    """The same batches with every target kept (the MC / exact Fisher refuse ignored targets)."""
    return [(X, y.clamp(min=0)) for X, y in data]


def _operators(data, group, loss_fn, sum_loss_fn, model):
    """The operators compared with their single-process versions (same keys in the parent)."""
    kw = dict(process_group=group)
    clean = _labelled(data)
    return {
        "hessian_mean": curvature.HessianOperator(model, loss_fn, data, **kw),
        "hessian_sum": curvature.HessianOperator(model, sum_loss_fn, data, **kw),
        "ggn_mean": curvature.GGNOperator(model, loss_fn, data, **kw),
        "fisher_empirical": curvature.FisherOperator(model, loss_fn, data, kind="empirical", **kw),
        "fisher_mc": curvature.FisherOperator(model, loss_fn, clean, kind="mc", mc_samples=2, seed=5, **kw),
        "fisher_exact_sum": curvature.FisherOperator(model, sum_loss_fn, clean, kind="exact", **kw),
        "blocks_hessian": curvature.block_diagonal(curvature.HessianOperator, model, loss_fn, data, **kw),
    }


def _estimates(H) -> dict:
    top = estimators.top_eigenvalues(H, k=2, seed=0)
    return {
        "top": top.eigenvalues,
        "hutchinson": estimators.hutchinson_trace(H, num_probes=12, block_size=6, seed=1).estimate,
        "hutchpp": estimators.hutchpp_trace(H, num_matvecs=12, seed=2).estimate,
        "xtrace": estimators.xtrace(H, num_matvecs=8, seed=3).estimate,
        "slq_nodes": estimators.spectral_density(H, num_probes=2, num_steps=8, seed=4).nodes,
        "slq_weights": estimators.spectral_density(H, num_probes=2, num_steps=8, seed=4).weights,
    }


def _ce(reduction="mean"):
    return nn.CrossEntropyLoss(reduction=reduction, ignore_index=-100)


# ------------------------------------------------------------------- 3-process battery
def _battery3(rank: int, world: int) -> dict:
    group = dist.group.WORLD
    model, X, y, batches = _problem()
    data = _shards(rank, world, batches)
    V = _probe_block(sum(p.numel() for p in model.parameters()))
    out: dict = {}
    for key, op in _operators(data, group, _ce(), _ce("sum"), model).items():
        out[key] = op @ V
    single = _single_shards(rank, world, X, y)
    H1 = curvature.HessianOperator(model, _ce(), single, process_group=group)
    out["hessian_single_batch"] = H1 @ V
    out["hessian_single_batch_cached"] = H1 @ V  # second product through the cached graph
    H = curvature.HessianOperator(model, _ce(), data, process_group=group)
    out["num_data"], out["num_batches"] = H.num_data, H.num_batches
    out["loss"], out["grad"] = H.loss_and_gradient()
    out.update(_estimates(H))
    out["sharpness"] = estimators.sharpness(model, _ce(), data, process_group=group, seed=0).value
    report_dir = Path(os.environ["CURVATURE_TEST_OUT"]) / "report"
    rep = estimators.spectrum_report(model, _ce(), data, process_group=group, top_k=2, num_probes=8, slq_probes=2,
                                     lanczos_steps=8, out_dir=report_dir, progress=False)
    out["report_eigenvalues"], out["report_files"] = torch.tensor(rep.eigenvalues), dict(rep.files)

    # a rank that raises inside a product pass: every rank fails, none hangs
    flaky = _Flaky(model, bad_rank=1)
    Hf = curvature.HessianOperator(flaky, _ce(), data, process_group=group)
    flaky.armed = True
    out["raising_rank"] = _error(lambda: Hf @ V[:, 0])
    flaky.armed = False
    out["after_failure"] = Hf @ V[:, 0]  # the group is still usable afterwards

    # mismatched data semantics / shapes across ranks: one clear error on every rank
    loss_r = _ce("sum") if rank == 2 else _ce()
    out["mismatch_reduction"] = _error(lambda: curvature.HessianOperator(model, loss_r, data, process_group=group))
    other = mlp(5, 7 if rank == 0 else 6, N_CLASSES, seed=3)
    out["mismatch_shapes"] = _error(lambda: curvature.GGNOperator(other, _ce(), data, process_group=group))

    # samplers: padding, a group of the wrong size, and the ambiguous default
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    ds = TensorDataset(X[:11], y[:11])  # 11 examples over 3 ranks: padded by DistributedSampler
    padded = DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds, world, rank, shuffle=False))
    out["sampler_padding"] = _error(lambda: curvature.HessianOperator(model, _ce(), padded, process_group=group))
    ds12 = TensorDataset(X, y)
    wrong = DataLoader(ds12, batch_size=4, sampler=DistributedSampler(ds12, 2, min(rank, 1), shuffle=False))
    out["sampler_wrong_size"] = _error(lambda: curvature.HessianOperator(model, _ce(), wrong, process_group=group))
    right = DataLoader(ds12, batch_size=3, sampler=DistributedSampler(ds12, world, rank, shuffle=False))
    out["sampler_default_refused"] = _error(lambda: curvature.HessianOperator(model, _ce(), right))
    out["sampler_local"] = curvature.HessianOperator(model, _ce(), right, process_group="local").num_data
    out["sampler_hessian"] = curvature.HessianOperator(model, _ce(), right, process_group=group) @ V

    # the helper for other accumulations (BackPACK diagonals, K-FAC factors): sums in place, mixed dtypes
    a, b = torch.full((2, 2), rank + 1.0, dtype=torch.float64), torch.arange(3, dtype=torch.float32) * (rank + 1)
    cdist.all_reduce_sum_([a, b], group)
    cdist.all_reduce_sum_([a], None)  # no group: unchanged
    out["all_reduce_sum"] = (a, b)
    return out


def _single_process_truth() -> dict:
    model, X, y, batches = _problem()
    V = _probe_block(sum(p.numel() for p in model.parameters()))
    truth = {key: op @ V for key, op in _operators(batches, None, _ce(), _ce("sum"), model).items()}
    H = curvature.HessianOperator(model, _ce(), batches)
    truth["loss"], truth["grad"] = H.loss_and_gradient()
    truth.update(_estimates(H))
    truth["sharpness"] = estimators.sharpness(model, _ce(), batches, seed=0).value
    keep = y != -100
    truth["dense_hessian_mean"] = dense_hessian(model, _ce(), X, y) @ V
    truth["dense_ggn_mean"] = dense_ggn(model, _ce(), X[keep], y[keep]) @ V
    return truth


@pytest.fixture(scope="module")
def battery3(tmp_path_factory):
    return _spawn("_battery3", 3, tmp_path_factory.mktemp("dist3")), _single_process_truth()


PRODUCTS = ["hessian_mean", "hessian_sum", "ggn_mean", "fisher_empirical", "fisher_mc", "fisher_exact_sum",
            "blocks_hessian"]


@pytest.mark.parametrize("key", PRODUCTS)
def test_products_equal_single_process_with_unequal_and_empty_shards(battery3, key):
    ranks, truth = battery3
    for r in ranks:
        assert torch.equal(r[key], ranks[0][key]), "ranks disagree"  # the same bytes everywhere
    err = (ranks[0][key] - truth[key]).abs().max() / truth[key].abs().max()
    assert err < 1e-12, f"{key}: {err:.2e}"


def test_products_against_dense_truth(battery3):
    ranks, truth = battery3
    for key, dense in [("hessian_mean", "dense_hessian_mean"), ("ggn_mean", "dense_ggn_mean"),
                       ("hessian_single_batch", "dense_hessian_mean"),
                       ("hessian_single_batch_cached", "dense_hessian_mean"),
                       ("sampler_hessian", "dense_hessian_mean")]:
        err = (ranks[0][key] - truth[dense]).abs().max() / truth[dense].abs().max()
        assert err < 1e-12, f"{key}: {err:.2e}"
        assert all(torch.equal(r[key], ranks[0][key]) for r in ranks)


def test_counts_loss_and_gradient_are_global(battery3):
    ranks, truth = battery3
    for r in ranks:
        assert (r["num_data"], r["num_batches"]) == (12, 4)
        assert torch.equal(r["grad"], ranks[0]["grad"]) and torch.equal(r["loss"], ranks[0]["loss"])
    assert abs(float(ranks[0]["loss"] - truth["loss"])) < 1e-14
    assert float((ranks[0]["grad"] - truth["grad"]).abs().max()) < 1e-14


@pytest.mark.parametrize("key", ["top", "hutchinson", "hutchpp", "xtrace", "slq_nodes", "slq_weights", "sharpness"])
def test_estimators_identical_on_every_rank_and_equal_single_process(battery3, key):
    ranks, truth = battery3
    for r in ranks:
        assert torch.equal(torch.as_tensor(r[key]), torch.as_tensor(ranks[0][key]))
    a, b = torch.as_tensor(ranks[0][key]), torch.as_tensor(truth[key])
    assert float((a - b).abs().max()) <= 1e-10 * max(1.0, float(b.abs().max())), key


def test_spectrum_report_identical_everywhere_written_by_rank_zero_only(battery3):
    ranks, truth = battery3
    assert all(torch.equal(r["report_eigenvalues"], ranks[0]["report_eigenvalues"]) for r in ranks)
    assert float((ranks[0]["report_eigenvalues"] - truth["top"]).abs().max()) < 1e-6 * float(truth["top"][0])
    assert set(ranks[0]["report_files"]) == {"png", "json"} and Path(ranks[0]["report_files"]["json"]).exists()
    assert ranks[1]["report_files"] == {} and ranks[2]["report_files"] == {}


def test_a_raising_rank_fails_every_rank_fast(battery3):
    ranks, _ = battery3
    cls, msg, seconds = ranks[1]["raising_rank"]
    assert cls == "ValueError" and "boom" in msg
    for r in (0, 2):
        cls, msg, seconds_r = ranks[r]["raising_rank"]
        assert cls == "RankFailedError" and "rank(s) [1]" in msg and "boom" in msg
        assert seconds_r < GLOO_TIMEOUT_S / 2  # the flag, not the timeout, ended the pass
    assert all(torch.equal(r["after_failure"], ranks[0]["after_failure"]) for r in ranks)


def test_mismatches_across_ranks_are_clear_errors_on_every_rank(battery3):
    ranks, _ = battery3
    for r in ranks:
        cls, msg, _ = r["mismatch_reduction"]
        assert cls == "ValueError" and "different operators" in msg and "reduction=sum" in msg
        cls, msg, _ = r["mismatch_shapes"]
        assert cls == "ValueError" and "different operators" in msg and "(7, 5)" in msg


def test_all_reduce_sum_helper(battery3):
    for r in battery3[0]:
        a, b = r["all_reduce_sum"]
        assert torch.equal(a, torch.full((2, 2), 6.0, dtype=torch.float64))
        assert torch.equal(b, torch.arange(3, dtype=torch.float32) * 6)


def test_sampler_checks(battery3):
    ranks, _ = battery3
    for r in ranks:
        cls, msg, _ = r["sampler_padding"]
        assert cls == "ValueError" and "pads the data set with 1 example" in msg and "shard_indices" in msg
        cls, msg, _ = r["sampler_wrong_size"]
        assert cls == "ValueError" and "for 2 ranks" in msg and "has 3 ranks" in msg
        cls, msg, _ = r["sampler_default_refused"]
        assert cls == "ValueError" and "group.WORLD" in msg and "'local'" in msg
    assert [r["sampler_local"] for r in ranks] == [4, 4, 4]


# ----------------------------------------------------------- 2 processes: DDP, NewtonCG
def _newton_cg_run(model, batch, closure_loss, steps=3):
    from solvers import NewtonCG

    opt = NewtonCG(model.parameters(), lr=1.0, model=model, loss_fn=_ce_plain(), curvature="ggn",
                   curvature_kwargs=closure_loss["kwargs"], cg_maxiter=20)
    for _ in range(steps):
        opt.step(closure_loss["closure"], batch=batch)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _ce_plain():
    return nn.CrossEntropyLoss()


def _battery2(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    group = dist.group.WORLD
    model, X, y, batches = _problem()
    V = _probe_block(sum(p.numel() for p in model.parameters()))
    data = _shards(rank, world, batches)
    out: dict = {}
    ddp = DDP(model)
    out["ddp_hessian_mean"] = curvature.HessianOperator(ddp, _ce(), data, process_group=group) @ V
    out["ddp_default_refused"] = _error(lambda: curvature.HessianOperator(ddp, _ce(), data))
    out["ddp_named_block"] = curvature.HessianOperator(ddp, _ce(), data, params=["module.2.weight", "2.bias"],
                                                       process_group=group) @ V[36:78]
    out["hessian_sum"] = curvature.HessianOperator(model, _ce("sum"), data, process_group=group) @ V

    # NewtonCG on a DDP model, equal shards (DDP averages gradients over ranks)
    torch.manual_seed(0)
    net = DDP(mlp(5, 6, N_CLASSES, seed=9))
    Xs, ys = X[rank * 6:(rank + 1) * 6], y[rank * 6:(rank + 1) * 6].clamp(min=0)

    def closure():
        for p in net.parameters():
            p.grad = None
        loss = _ce_plain()(net(Xs), ys)
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        return total / world

    out["newton_cg"] = _newton_cg_run(net, (Xs, ys), {"closure": closure, "kwargs": {"process_group": group}})

    # finite-difference Hessian: a DDP model with unequal shards, and an FSDP2-sharded model
    from curvature.finite_difference import FiniteDifferenceHessianOperator
    from torch.distributed.fsdp import fully_shard

    out["fd_ddp"] = FiniteDifferenceHessianOperator(DDP(_problem()[0]), _ce(), data, process_group=group) @ V
    sharded = _problem()[0]
    for layer in sharded:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(sharded)
    lockstep = [batches[0:2], batches[2:4]][rank]  # FSDP: the same number of batches on every rank
    F = FiniteDifferenceHessianOperator(sharded, _ce(), lockstep, process_group=group)
    out["fd_fsdp"] = F @ V
    out["fd_fsdp_top"] = estimators.top_eigenvalues(F, k=1, seed=0, tol=1e-7).eigenvalues
    out["fd_fsdp_unequal"] = _error(lambda: FiniteDifferenceHessianOperator(sharded, _ce(), data, process_group=group))

    # one cached batch per rank, then written through .data on rank 0 only (a swap of two examples: the
    # version counter and the sums do not change); the checksum sees it there, and every rank must redo
    # the pass with it (a rank redoing alone would pair its all_reduce with the others' next one)
    Xr, yr = X[rank * 6:(rank + 1) * 6].clone(), y[rank * 6:(rank + 1) * 6]
    cached = curvature.HessianOperator(model, _ce(), (Xr, yr), process_group=group)
    out["cached_before"] = cached @ V
    if rank == 0:
        Xr.data[[0, 2]] = Xr.data[[2, 0]].clone()
    out["cached_after_write"] = cached @ V
    out["cached_next"] = cached @ V[:, :1]  # the ranks are still in step

    # last: a rank that never joins (rank 1 skips the operator) -> the group's timeout ends the wait
    short = dist.new_group(backend="gloo", timeout=timedelta(seconds=3))
    if rank == 0:
        out["absent_rank"] = _error(lambda: curvature.HessianOperator(model, _ce(), data, process_group=short))
    else:
        time.sleep(6)  # alive but absent (a process that exits is noticed at once: "Connection closed by peer")
    out["_abandon_group"] = True  # the short group is broken now: exit without tearing it down
    return out


@pytest.fixture(scope="module")
def battery2(tmp_path_factory):
    return _spawn("_battery2", 2, tmp_path_factory.mktemp("dist2"))


def test_two_processes_ddp_model_products(battery2):
    ranks = battery2
    model, X, y, batches = _problem()
    V = _probe_block(sum(p.numel() for p in model.parameters()))
    for key, truth in [("ddp_hessian_mean", curvature.HessianOperator(model, _ce(), batches) @ V),
                       ("hessian_sum", curvature.HessianOperator(model, _ce("sum"), batches) @ V)]:
        assert all(torch.equal(r[key], ranks[0][key]) for r in ranks)
        assert float((ranks[0][key] - truth).abs().max() / truth.abs().max()) < 1e-12
    block = curvature.HessianOperator(model, _ce(), batches, params=["2.weight", "2.bias"]) @ V[36:78]
    assert float((ranks[0]["ddp_named_block"] - block).abs().max() / block.abs().max()) < 1e-12
    for r in ranks:
        cls, msg, _ = r["ddp_default_refused"]
        assert cls == "ValueError" and "DistributedDataParallel" in msg


def test_a_write_through_data_on_one_rank_makes_every_rank_recompute(battery2):
    ranks = battery2
    model, X, y, _ = _problem()
    V = _probe_block(sum(p.numel() for p in model.parameters()))
    halves = [(X[0:6].clone(), y[0:6]), (X[6:12], y[6:12])]
    before = curvature.HessianOperator(model, _ce(), halves) @ V
    halves[0][0][[0, 2]] = halves[0][0][[2, 0]].clone()
    after = curvature.HessianOperator(model, _ce(), halves) @ V
    assert float((after - before).abs().max()) > 1e-3 * float(before.abs().max())  # the swap matters
    for r in ranks:
        for key, truth in (("cached_before", before), ("cached_after_write", after), ("cached_next", after[:, :1])):
            assert float((r[key] - truth).abs().max() / truth.abs().max()) < 1e-12, key


def test_newton_cg_under_ddp_takes_identical_steps_equal_to_single_process(battery2):
    ranks = battery2
    assert torch.equal(ranks[0]["newton_cg"], ranks[1]["newton_cg"])
    _, X, y, _ = _problem()
    net = mlp(5, 6, N_CLASSES, seed=9)
    y = y.clamp(min=0)

    def closure():
        for p in net.parameters():
            p.grad = None
        loss = _ce_plain()(net(X), y)
        loss.backward()
        return loss

    theta = _newton_cg_run(net, (X, y), {"closure": closure, "kwargs": {}})
    start = torch.cat([p.detach().reshape(-1) for p in mlp(5, 6, N_CLASSES, seed=9).parameters()])
    assert float((theta - start).norm()) > 0.1  # the steps moved
    assert float((ranks[0]["newton_cg"] - theta).abs().max()) < 1e-10


# ------------------------------------------------------------ single-process behaviour
def test_without_torch_distributed_nothing_changes():
    model, X, y, batches = _problem()
    with pytest.raises(RuntimeError, match="not initialised"):
        curvature.HessianOperator(model, _ce(), batches, process_group=object())
    with pytest.raises(ValueError, match="process_group must be None"):
        curvature.HessianOperator(model, _ce(), batches, process_group="world")
    H = curvature.HessianOperator(model, _ce(), batches, process_group="local")
    assert H._loop.shards.group is None and H.num_data == 12
    assert cdist.is_rank_zero()


def test_finite_difference_hessian_on_ddp_and_fsdp_models(battery2):
    ranks = battery2
    model, X, y, batches = _problem()
    V = _probe_block(sum(p.numel() for p in model.parameters()))
    H = curvature.HessianOperator(model, _ce(), batches)
    exact = H @ V
    bound = 10 * torch.finfo(torch.float64).eps ** (2 / 3)  # tests/test_finite_difference.py
    for key in ("fd_ddp", "fd_fsdp"):
        assert torch.equal(ranks[0][key], ranks[1][key])
        rel = (ranks[0][key] - exact).norm(dim=0) / exact.norm(dim=0)
        assert float(rel.max()) < bound, (key, rel.tolist())
    top = torch.linalg.eigvalsh(dense_hessian(model, _ce(), X, y))[-1]
    assert torch.equal(ranks[0]["fd_fsdp_top"], ranks[1]["fd_fsdp_top"])
    assert abs(float(ranks[0]["fd_fsdp_top"][0] - top)) < 1e-6 * float(top)
    for r in ranks:
        cls, msg, _ = r["fd_fsdp_unequal"]
        assert cls == "ValueError" and "same number of batches" in msg


def test_a_rank_that_never_joins_is_ended_by_the_group_timeout(battery2):
    cls, msg, seconds = battery2[0]["absent_rank"]
    assert cls != "nothing raised" and 2.5 < seconds < 15, (cls, msg, seconds)
