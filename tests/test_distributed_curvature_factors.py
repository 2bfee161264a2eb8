"""BackPACK diagonals, K-FAC and EKFAC factors on sharded data (2 and 3 gloo processes, CPU).

The data set is a list of batches; rank ``r`` holds a consecutive run of them (unequal
runs, one rank empty with three processes), so the global batch indices, and with them
the sampled labels of the Monte-Carlo kinds, are those of one process holding the whole
list.  Every data-parallel result must equal the single-process result on all batches
(float64, 1e-12 relative) on every rank, for mean and sum reductions; a DDP-wrapped
model is unwrapped; settings that differ across ranks and a rank that raises fail every
rank with a clear error.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_harness import error_of, spawn
from models import classification_data, cnn, mlp

SIZES = (4, 3, 5, 2, 6)  # the batches of the whole data set
RUNS = {2: ((0, 2), (2, 5)), 3: ((0, 3), (3, 3), (3, 5))}  # rank -> [first, last) batch; rank 1 of 3 empty


def _batches(model_kind: str):
    shape = (5,) if model_kind == "mlp" else (1, 7, 7)
    X, y = classification_data(sum(SIZES), shape, 3, seed=11)
    out, start = [], 0
    for s in SIZES:
        out.append((X[start:start + s], y[start:start + s]))
        start += s
    return out


def _model(model_kind: str):
    return mlp(5, 6, 3, seed=2) if model_kind == "mlp" else cnn(2, 3, seed=2)


def _quantities(model, data, reduction: str, group) -> dict[str, torch.Tensor]:
    import curvature

    loss = nn.CrossEntropyLoss(reduction=reduction)
    out = {
        "ggn_diag_exact": curvature.ggn_diagonal(model, loss, data, process_group=group).diag,
        "ggn_diag_mc": curvature.ggn_diagonal(model, loss, data, kind="mc", mc_samples=2, seed=3,
                                              process_group=group).diag,
        "hessian_diag": curvature.hessian_diagonal(model, loss, data, process_group=group).diag,
        "ekfac_kflr": curvature.ekfac(model, loss, data, process_group=group).to_dense(),
    }
    for kind in ("kflr", "kfac", "empirical", "kfra"):
        out[f"kfac_{kind}"] = curvature.kfac(model, loss, data, kind=kind, seed=5, process_group=group).to_dense()
    out["kfac_kflr_reduce"] = curvature.kfac(model, loss, data, approx="reduce", process_group=group).to_dense()
    return out


def _cases(world: int):
    return [(m, r) for m in ("mlp", "cnn") for r in ("mean", "sum")] if world == 3 else [("mlp", "mean")]


def _ranks(rank: int, world: int) -> dict:
    import curvature
    from curvature.distributed import RankFailedError  # noqa: F401 - class names are compared in the parent

    group = dist.group.WORLD
    first, last = RUNS[world][rank]
    out: dict = {}
    for model_kind, reduction in _cases(world):
        shard = _batches(model_kind)[first:last]
        out[(model_kind, reduction)] = _quantities(_model(model_kind), shard, reduction, group)
    shard = _batches("mlp")[first:last]
    if world == 2:
        ddp = DDP(_model("mlp"))
        out["ddp"] = {
            "kfac_kflr": curvature.kfac(ddp, nn.CrossEntropyLoss(), shard, process_group=group).to_dense(),
            "ggn_diag_exact": curvature.ggn_diagonal(ddp, nn.CrossEntropyLoss(), shard, process_group=group).diag,
        }
        out["ddp_without_group"] = error_of(lambda: curvature.kfac(ddp, nn.CrossEntropyLoss(), shard))
    # settings that differ across ranks, and a rank whose forward raises inside the pass
    out["mismatch"] = error_of(lambda: curvature.kfac(_model("mlp"), nn.CrossEntropyLoss(), shard,
                                                      kind="kflr" if rank == 0 else "empirical", process_group=group))
    bad = [(X[:, :4], y) for X, y in shard] if rank == world - 1 else shard  # wrong feature size on the last rank
    out["raising_kfac"] = error_of(lambda: curvature.kfac(_model("mlp"), nn.CrossEntropyLoss(), bad,
                                                          process_group=group))
    out["raising_diag"] = error_of(lambda: curvature.ggn_diagonal(_model("mlp"), nn.CrossEntropyLoss(), bad,
                                                                  process_group=group))
    out["after_failure"] = curvature.hessian_diagonal(_model("mlp"), nn.CrossEntropyLoss(), shard,
                                                      process_group=group).diag  # the group is still usable
    return out


@pytest.fixture(scope="module")
def ranks2(tmp_path_factory):
    return spawn("test_distributed_curvature_factors", "_ranks", 2, tmp_path_factory.mktemp("factors2"))


@pytest.fixture(scope="module")
def ranks3(tmp_path_factory):
    return spawn("test_distributed_curvature_factors", "_ranks", 3, tmp_path_factory.mktemp("factors3"))


@pytest.fixture(params=[2, 3], ids=["2 processes", "3 processes"])
def world_and_ranks(request):
    return request.param, request.getfixturevalue(f"ranks{request.param}")


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and float((a - b).abs().max()) <= 1e-12 * max(float(b.abs().max()), 1e-300)


def test_factors_and_diagonals_equal_single_process_on_every_rank(world_and_ranks):
    world, ranks = world_and_ranks
    for model_kind, reduction in _cases(world):
        truth = _quantities(_model(model_kind), _batches(model_kind), reduction, None)
        for rank, out in enumerate(ranks):
            got = out[(model_kind, reduction)]
            assert set(got) == set(truth)
            for key, value in truth.items():
                assert float(value.abs().max()) > 0, key
                assert _close(got[key], value), (world, rank, model_kind, reduction, key,
                                                 float((got[key] - value).abs().max()))


def test_ddp_models_are_unwrapped_and_need_a_group(ranks2):
    import curvature

    model, loss, data = _model("mlp"), nn.CrossEntropyLoss(), _batches("mlp")
    truth_k = curvature.kfac(model, loss, data).to_dense()
    truth_d = curvature.ggn_diagonal(model, loss, data).diag
    for out in ranks2:
        assert _close(out["ddp"]["kfac_kflr"], truth_k) and _close(out["ddp"]["ggn_diag_exact"], truth_d)
        name, message = out["ddp_without_group"]
        assert name == "ValueError" and "process_group" in message


def test_mismatched_settings_and_a_raising_rank_fail_every_rank(world_and_ranks):
    world, ranks = world_and_ranks
    for rank, out in enumerate(ranks):
        name, message = out["mismatch"]
        assert name == "ValueError" and "describe different operators" in message and "kind=" in message, out["mismatch"]
        for key in ("raising_kfac", "raising_diag"):
            name, message = out[key]
            if rank == world - 1:  # the failing rank raises its own error
                assert name == "RuntimeError" and "shapes cannot be multiplied" in message, out[key]
            else:
                assert name == "RankFailedError" and f"rank {world - 1}" in message, out[key]
    model, data = _model("mlp"), _batches("mlp")
    import curvature

    truth = curvature.hessian_diagonal(model, nn.CrossEntropyLoss(), data).diag
    assert all(_close(out["after_failure"], truth) for out in ranks)
