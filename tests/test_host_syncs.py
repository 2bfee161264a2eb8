"""Host reads in hot paths, counted on the CPU (issue 10, item 6: GPU-clean).

On an accelerator every read of a device value by Python (``.item()``, ``bool(t)``,
``float(t)``, ``.tolist()``, ``.cpu()``, ``torch.equal``, ``nonzero``, boolean-mask indexing)
waits for the device to finish.  :class:`HostReads` counts them through a
``TorchFunctionMode`` (every tensor method and torch function passes through it), so
the counts below are what a CUDA run would sync.  Not counted: reads of torch's RNG
states (``torch.get_rng_state()`` returns a host tensor on every device; the detector
tags them), and ``.to("cpu")`` (on this machine indistinguishable from ``.to(op.device)``).
``LinearOperator.to_scipy`` is the documented exception (scipy needs host arrays).
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import curvature
import estimators
from curvature import DenseOperator, FisherOperator, GGNOperator, HessianOperator
from dense_truth import dense_hessian, rel_err
from models import classification_data, mlp, regression_data, regression_mlp
from solvers import GNBEstimator, HutchinsonEstimator, Sophia

_READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "equal",
          "allclose", "nonzero", "argwhere", "masked_select", "unique"}


def _is_mask_index(func, args) -> bool:
    if getattr(func, "__name__", "") != "__getitem__" or len(args) < 2:
        return False
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)


class HostReads(TorchFunctionMode):
    """Context manager counting host reads of tensor values (see the module docstring).

    ``reads`` lists ``(name, where)`` for every read, ``where`` a short stack for messages.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, str]] = []

    def __enter__(self):
        self._patch = pytest.MonkeyPatch()
        original = torch.get_rng_state

        def tagged():
            state = original()
            state._host_state = True  # host-resident on every device: not a device read
            return state

        self._patch.setattr(torch, "get_rng_state", tagged)
        return super().__enter__()

    def __exit__(self, *exc):
        self._patch.undo()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if (name in _READS or _is_mask_index(func, args)) and not (
                args and getattr(args[0], "_host_state", False)):
            self.reads.append((name, "".join(traceback.format_stack(limit=7)[:-2])))
        return func(*args, **(kwargs or {}))

    @property
    def count(self) -> int:
        return len(self.reads)

    def report(self) -> str:
        return "\n".join(f"{name}:\n{where}" for name, where in self.reads)


def _quiet(op):
    """Every check that reads the host switched off: no checksum, no finiteness test."""
    op.cache_check = "version"
    op.check_finite = False
    return op


def test_the_detector_sees_each_kind_of_read_and_not_rng_states():
    t = torch.tensor([1.0, 2.0, -3.0])
    reads = [lambda: t[0].item(), lambda: bool(t[0] > 0), lambda: float(t[1]), lambda: int(t[1]),
             lambda: t.tolist(), lambda: t.numpy(), lambda: t.cpu(), lambda: torch.equal(t, t),
             lambda: t.nonzero(), lambda: t[t > 0], lambda: [0, 1, 2][torch.tensor(1)]]
    for read in reads:
        with HostReads() as d:
            read()
        assert d.count == 1, d.report()
    with HostReads() as d:
        (t * 2).sum()
        torch.get_rng_state().numpy()
        t[1:].clone()
    assert d.count == 0, d.report()


# ---------------------------------------------------------------- operators
MAKERS = {
    "hessian": HessianOperator,
    "ggn": GGNOperator,
    "fisher_exact": lambda *a, **k: FisherOperator(*a, kind="exact", **k),
    "fisher_mc": lambda *a, **k: FisherOperator(*a, kind="mc", **k),
}


@pytest.mark.parametrize("kind", list(MAKERS))
def test_a_cached_product_reads_the_host_once_and_never_with_checks_off(kind):
    model = mlp()
    X, y = classification_data(n=10)
    op = MAKERS[kind](model, nn.CrossEntropyLoss(), (X, y))
    V = torch.randn(op.shape[0], 3, dtype=torch.float64)
    op @ V  # builds and caches the state
    with HostReads() as d:
        op @ V
    assert d.count == 1, d.report()  # the checksum comparison and the finiteness test, read together
    op.check_finite = False
    with HostReads() as d:
        op @ V
    assert d.count == 1, d.report()  # the checksum alone
    _quiet(op)
    with HostReads() as d:
        op @ V
        op @ V[:, 0]
    assert d.count == 0, d.report()


def test_per_layer_blocks_share_the_parents_one_read():
    model = mlp()
    X, y = classification_data(n=10)
    B = curvature.block_diagonal(HessianOperator, model, nn.CrossEntropyLoss(), (X, y))
    V = torch.randn(B.shape[0], 2, dtype=torch.float64)
    B @ V
    with HostReads() as d:
        B @ V
        B.blocks[0] @ V[:B.blocks[0].shape[0]]
    assert d.count == 2, d.report()  # one per product


def test_a_write_through_data_is_caught_by_the_deferred_checksum():
    """The checksum is compared in the pass's one read; a stale state found there is rebuilt."""
    model = mlp()
    X, y = classification_data(n=10)
    loss_fn = nn.CrossEntropyLoss()
    H = HessianOperator(model, loss_fn, (X, y))
    V = torch.randn(H.shape[0], 2, dtype=torch.float64)
    H @ V
    with torch.no_grad():
        model[0].weight.data.mul_(1.3)  # no _version bump: only the checksum sees it
    assert rel_err(H @ V, dense_hessian(model, loss_fn, X, y) @ V) < 1e-10
    with HostReads() as d:
        H @ V
    assert d.count == 1, d.report()  # the rebuilt state is cached again


def test_nonfinite_products_are_refused_in_the_same_read():
    model = mlp()
    X, y = classification_data(n=10)
    H = HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    v = torch.randn(H.shape[0], dtype=torch.float64)
    H @ v
    with torch.no_grad():
        model[2].weight.data[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="HessianOperator produced NaN or inf"):
        H @ v
    H.check_finite = False
    assert torch.isnan(H @ v).any()


def test_a_pass_over_several_batches_reads_the_host_once_per_check():
    """Fingerprints (data check) and finiteness: one read each per pass; none with both off."""
    model = regression_mlp()
    X, y = regression_data(n=12)
    data = list(zip(X.split(4), y.split(4)))
    op = GGNOperator(model, nn.MSELoss(), data)  # MSE's mean denominator needs no read
    V = torch.randn(op.shape[0], 2, dtype=torch.float64)
    with HostReads() as d:
        op @ V
    assert d.count == 2, d.report()
    quiet = _quiet(GGNOperator(model, nn.MSELoss(), data, check_data=False))
    with HostReads() as d:
        quiet @ V
    assert d.count == 0, d.report()
    # cross-entropy counts the non-ignored targets of every batch: one read per batch (documented)
    Xc, yc = classification_data(n=12)
    ce = _quiet(HessianOperator(mlp(), nn.CrossEntropyLoss(), list(zip(Xc.split(4), yc.split(4))),
                                check_data=False))
    with HostReads() as d:
        ce @ torch.randn(ce.shape[0], dtype=torch.float64)
    assert d.count == 3, d.report()


# ---------------------------------------------------------------- estimators
def _operators():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(30, 30, generator=g, dtype=torch.float64)
    dense = DenseOperator(A + A.T)
    dense.check_finite = False
    model = mlp()
    X, y = classification_data(n=10)
    H = _quiet(HessianOperator(model, nn.CrossEntropyLoss(), (X, y)))
    H @ torch.zeros(H.shape[0], dtype=torch.float64)  # warm: the state is built outside the counted loop
    return {"dense": dense, "hessian": H}


@pytest.mark.parametrize("name", ["dense", "hessian"])
def test_trace_and_diagonal_loops_read_nothing_without_a_tolerance(name):
    op = _operators()[name]
    with HostReads() as d:
        t = estimators.hutchinson_trace(op, 40, block_size=8, seed=1)
        D = estimators.hutchinson_diagonal(op, 40, block_size=8, seed=1)
        estimators.hutchpp_trace(op, 24, block_size=8, seed=1)
    assert d.count == 0, d.report()
    assert t.num_matvecs == 40 and D.num_matvecs == 40
    assert t.estimate.device == op.device and D.estimate.device == op.device  # results stay on the device


@pytest.mark.parametrize("name", ["dense", "hessian"])
def test_an_adaptive_trace_reads_once_per_tested_block(name):
    op = _operators()[name]
    with HostReads() as d:
        r = estimators.hutchinson_trace(op, 40, block_size=8, rtol=1e-12, min_probes=10, seed=1)
    assert r.num_probes == 40 and not r.converged
    assert d.count == 4, d.report()  # tested after 16, 24, 32 and 40 probes
    op.check_finite = True
    with HostReads() as d:
        estimators.hutchinson_trace(op, 40, block_size=8, rtol=1e-12, min_probes=10, seed=1)
    assert d.count == 4 + 5, d.report()  # plus the finiteness test of each of the 5 block products


def test_probes_and_generators_live_on_the_operators_device():
    from estimators._probes import draw_probes, make_generator

    op = _operators()["hessian"]
    gen, _ = make_generator(3, None, op.device)
    assert gen.device.type == op.device.type
    W = draw_probes(op, 4, "rademacher", gen)
    assert W.device == op.device and W.dtype == op.dtype
    F = FisherOperator(mlp(), nn.CrossEntropyLoss(), classification_data(n=10), kind="mc")
    assert F._batch_generator(0).device.type == F.device.type


# ------------------------------------------------------------------- Sophia
@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_sophia_steps_read_nothing_with_the_nonfinite_checks_off(estimator):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    X, y = classification_data(n=10, dtype=torch.float32)
    if estimator == "gnb":
        est, curvature_input = GNBEstimator(model, "ce", seed=0), X
    else:
        est, curvature_input = HutchinsonEstimator(model, nn.CrossEntropyLoss(), seed=0), (X, y)
    counts = {}
    for nonfinite in ("raise", "off"):
        opt = Sophia(model.parameters(), lr=1e-3, estimator=est, update_interval=2, nonfinite=nonfinite)
        counts[nonfinite] = []
        for _ in range(4):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X), y).backward()
            with HostReads() as d:
                opt.step(curvature_input=curvature_input)
            counts[nonfinite].append(d.count)
    assert counts["raise"] == [1, 1, 2, 1]  # the gradients' check; plus the estimate's on the refresh step
    assert counts["off"] == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="'raise', 'skip' or 'off'"):
        Sophia(model.parameters(), lr=1e-3, estimator=est, nonfinite="ignore")
