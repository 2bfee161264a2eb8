"""Data parallelism on ``torch.distributed``: every rank holds a shard, products are global.

An operator built with ``process_group=`` on every rank of a group is the curvature of
the *union* of the ranks' data: each product pass sums the per-rank contributions with
one ``all_reduce`` (per block of columns), and the counts of examples, batches and the
loss's mean denominators are summed once at construction, so every batch gets the
weight it would get in one process holding all the data (mean and sum reductions,
token-level losses with ignored targets).  Every rank receives the same bytes, so
estimators on top (probes drawn from the seed, the same on every rank) return
identical results everywhere and need no change: they never see ranks.

Opt-in, not automatic.  ``process_group=None`` (default) is this process's data only,
as without ``torch.distributed``; pass ``torch.distributed.group.WORLD`` (or any group)
for the data-parallel curvature, or ``"local"`` for this rank's shard explicitly.  A
default that reduced whenever a group is initialised would hang the common
"curvature on rank 0 only" pattern (the other ranks never join the collective);
reducing never would silently return a shard's curvature to a DDP user.  So the
default refuses the ambiguous case: with a group of more than one process initialised
and evidence that the data is a shard (a ``DistributedDataParallel`` model, or a
loader whose sampler is a ``DistributedSampler``), ``process_group=None`` raises and
asks for ``WORLD`` or ``"local"``.

Models wrapped in ``DistributedDataParallel`` are unwrapped (``.module``): products use
functional calls of the inner module and never run DDP's gradient hooks; parameter
names (``params=[...]``) may be given either way (``"module.fc.weight"`` or ``"fc.weight"``).

Checks, once at construction, with one small ``all_gather`` (:meth:`ShardGroup.agree`):
every rank must describe the same operator (class, loss type and its settings,
reduction, mode, parameter names / shapes / dtype) and a ``DistributedSampler`` must be
set up for this group (``num_replicas`` = group size, ``rank`` = group rank, no padded
or dropped examples).  A rank that raises during the construction scan or a product
pass makes every rank raise (the error flag travels in the same collective as the
data, at no extra cost; the failing rank's message is gathered only on failure).  A
rank that dies or never joins is caught by the process group's timeout: pass
``timeout=`` to ``torch.distributed.init_process_group`` (gloo and NCCL honour it).

Helpers for other per-batch accumulations (BackPACK diagonals, K-FAC factors):
:func:`all_reduce_sum_` and :meth:`ShardGroup.summed`; rank-0-only writing:
:func:`is_rank_zero`, :func:`write_on_rank_zero`.

Example (``torchrun --nproc_per_node=2 script.py``)::

    dist.init_process_group("gloo")
    loader = DataLoader(Subset(dataset, shard_indices(len(dataset))), batch_size=64)
    H = HessianOperator(model, loss_fn, loader, process_group=dist.group.WORLD)
    top = estimators.top_eigenvalues(H, k=5, seed=0)   # identical on every rank
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "LOCAL",
    "RankFailedError",
    "ShardGroup",
    "resolve_group",
    "unwrap_model",
    "prepare",
    "shard_indices",
    "all_reduce_sum_",
    "is_rank_zero",
    "write_on_rank_zero",
    "describe_operator",
    "describe",
]

#: ``process_group="local"``: this rank's data only, no communication.
LOCAL = "local"


class RankFailedError(RuntimeError):
    """Raised on the other ranks when one rank raised during a collective pass."""


def _dist():
    import torch.distributed as dist

    return dist


def _initialised() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def _ddp_class():
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` (recursively); any other model unchanged."""
    ddp = _ddp_class()
    while isinstance(model, ddp):
        model = model.module
    return model


def _distributed_sampler(data):
    from torch.utils.data import DataLoader, DistributedSampler

    if isinstance(data, DataLoader):
        for s in (data.sampler, getattr(data.batch_sampler, "sampler", None)):
            if isinstance(s, DistributedSampler):
                return s
    return None


def shard_indices(n: int, process_group=None) -> range:
    """This rank's contiguous share of ``range(n)``: sizes differ by at most one, none padded.

    Use it as ``Subset(dataset, shard_indices(len(dataset), group))`` where a
    ``DistributedSampler`` would pad or drop examples (``n`` not a multiple of the
    group size).  Ranks ``r < n % size`` get one example more; shards may be empty.
    """
    dist = _dist()
    size, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    base, extra = divmod(int(n), size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def resolve_group(process_group, model: nn.Module | None = None, data=None):
    """The process group an operator reduces over, or ``None`` for this process's data only.

    Args:
        process_group: ``None`` (default), ``"local"``, or a ``torch.distributed``
            process group (``torch.distributed.group.WORLD`` for all ranks).
        model, data: inspected for evidence of sharding when ``process_group`` is
            ``None`` and for a ``DistributedSampler`` set up for another group size.

    Raises:
        ValueError: ``None`` while the data looks like a shard of a larger data set
            (see the module docstring); a group this process is not a member of; a
            ``DistributedSampler`` for a different group size or rank, or one that
            pads / drops examples; a DDP model whose group has another size.
        RuntimeError: a group is passed but ``torch.distributed`` is not initialised.
        TypeError: anything else.
    """
    if isinstance(process_group, str):
        if process_group != LOCAL:
            raise ValueError(f"process_group must be None, {LOCAL!r} or a process group, got {process_group!r}.")
        return None
    sampler = _distributed_sampler(data)
    if process_group is None:
        if _initialised() and _dist().get_world_size() > 1:
            evidence = None
            if model is not None and isinstance(model, _ddp_class()):
                evidence = "the model is wrapped in DistributedDataParallel"
            elif sampler is not None:
                evidence = "the data loader's sampler is a DistributedSampler"
            if evidence:
                raise ValueError(
                    f"torch.distributed is initialised and {evidence}, so this rank's data is "
                    "probably a shard: pass process_group=torch.distributed.group.WORLD for the "
                    "curvature of the whole data set (every rank must then build the operator), or "
                    "process_group='local' for the curvature of this rank's shard alone."
                )
        return None
    if not _initialised():
        raise RuntimeError(
            "process_group was given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first (or pass process_group=None)."
        )
    dist = _dist()
    try:
        rank, size = dist.get_rank(process_group), dist.get_world_size(process_group)
    except (TypeError, AttributeError, ValueError, RuntimeError) as e:
        raise TypeError(f"process_group must be a torch.distributed process group, got {process_group!r}.") from e
    if rank < 0:
        raise ValueError("This process is not a member of process_group; build the operator on its members only.")
    if sampler is not None:
        if sampler.num_replicas != size or sampler.rank != rank:
            raise ValueError(
                f"The DistributedSampler splits the data for {sampler.num_replicas} ranks (this one "
                f"rank {sampler.rank}), but process_group has {size} ranks (this one rank {rank}); "
                "build the sampler with num_replicas and rank of the same group."
            )
        n = len(sampler.dataset)
        if n % size:
            what = "drops" if sampler.drop_last else "pads the data set with"
            count = n % size if sampler.drop_last else size - n % size
            raise ValueError(
                f"The DistributedSampler {what} {count} example(s) so that every rank gets the same "
                f"number ({n} examples over {size} ranks): the curvature would not be the one of the "
                "data set. Shard without padding instead: "
                "Subset(dataset, curvature.distributed.shard_indices(len(dataset), group))."
            )
    if model is not None and isinstance(model, _ddp_class()):
        ddp_group = getattr(model, "process_group", None)
        if ddp_group is not None and dist.get_world_size(ddp_group) != size:
            raise ValueError(
                f"The DistributedDataParallel model runs on a group of {dist.get_world_size(ddp_group)} "
                f"ranks but process_group has {size}; pass the model's group (model.process_group)."
            )
    return process_group


def prepare(model: nn.Module, data, process_group, params=None) -> tuple[nn.Module, object, object | None]:
    """``(unwrapped model, params, group or None)``: what an operator stores (see :func:`resolve_group`).

    Parameter names given for a ``DistributedDataParallel`` model (``"module.0.weight"``)
    are mapped to those of the inner module (``"0.weight"``); tensors need no mapping.
    """
    group = resolve_group(process_group, model, data)
    inner = unwrap_model(model)
    if inner is not model and params is not None:
        prefixes = {n: n[len(n) - len(m):] for n, m in zip(dict(model.named_parameters()),
                                                          dict(inner.named_parameters()))}
        params = [prefixes.get(p, p) if isinstance(p, str) else p
                  for p in ([params] if isinstance(params, (str, Tensor)) else params)]
    return inner, params, group


def describe_operator(op) -> str:
    """The settings every rank's operator must share, as one string (hashed by :meth:`ShardGroup.agree`)."""
    settings = {attr: getattr(op, attr) for attr in ("reduction", "mode", "kind", "mc_samples", "seed", "dtype")
                if hasattr(op, attr)}
    return describe(type(op).__name__, getattr(op, "loss_fn", None), getattr(op, "param_names", []),
                    getattr(op, "param_shapes", []), **settings)


def describe(what: str, loss_fn, param_names, param_shapes, **settings) -> str:
    """The settings every rank's computation ``what`` must share, as one string.

    For accumulations that are not operators (BackPACK diagonals, K-FAC factors): the
    loss (class, scalar settings, buffer shapes), ``settings`` and the parameters' names
    and shapes.
    """
    loss_desc = type(loss_fn).__name__
    if isinstance(loss_fn, nn.Module):
        simple = {k: v for k, v in sorted(vars(loss_fn).items())
                  if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))}
        buffers = {k: tuple(b.shape) for k, b in loss_fn.named_buffers()}
        loss_desc += f"{simple}{buffers}"
    parts = [what, loss_desc] + [f"{k}={v}" for k, v in settings.items()]
    parts.append(",".join(f"{n}:{tuple(s)}" for n, s in zip(param_names, param_shapes)))
    return "|".join(parts)


def _digest(text: str) -> list[float]:
    """Three 24-bit pieces of a SHA-256 of ``text`` (exact in float32 and float64)."""
    h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:9], "big")
    return [float((h >> s) & 0xFFFFFF) for s in (48, 24, 0)]


def _comm_device(group, fallback) -> torch.device:
    """Where small control tensors live: CUDA for NCCL, else ``fallback``'s device."""
    if _dist().get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(fallback)


class ShardGroup:
    """The collectives of one data-parallel operator (a no-op object for ``group=None``).

    Attributes: ``group`` (the process group or ``None``), ``rank``, ``size`` (0 and 1
    without a group).
    """

    def __init__(self, group=None) -> None:
        self.group = group
        dist = _dist()
        self.rank = dist.get_rank(group) if group is not None else 0
        self.size = dist.get_world_size(group) if group is not None else 1

    def agreement(self, signature: str, device) -> "_Agreement":
        """Context manager around a construction scan: ``with g.agreement(sig, dev) as a: ...; a.counts = [...]``.

        On exit one ``all_gather`` of ``[failed, signature digest, *counts]`` (float64)
        checks that every rank succeeded and describes the same operator; then
        ``a.totals`` (the counts summed over ranks) and ``a.before`` (summed over lower
        ranks, e.g. a global batch offset) are set.  Without a group they are the
        local counts and zeros.
        """
        return _Agreement(self, signature, device)

    def summed(self, tensors: Sequence[Tensor]) -> "_Summed":
        """Context manager around a pass: on exit the ``tensors`` are summed in place over ranks.

        The error flag travels in the same ``all_reduce`` (one per dtype of the
        tensors): if the pass raised on any rank, every rank raises -- the failing
        rank its own exception, the others :class:`RankFailedError` naming it.
        """
        return _Summed(self, list(tensors))

    def all_equal(self, value: float) -> bool:
        """Whether every rank passed the same ``value`` (one ``all_gather``; ``True`` without a group)."""
        if self.group is None:
            return True
        device = _comm_device(self.group, "cpu")
        rows = [torch.empty(1, dtype=torch.float64, device=device) for _ in range(self.size)]
        _dist().all_gather(rows, torch.tensor([float(value)], dtype=torch.float64, device=device), group=self.group)
        return bool((torch.cat(rows) == rows[0]).all())

    def sum_scalar(self, value: float) -> float:
        """``value`` summed over the ranks (one ``all_reduce`` of a float64; itself without a group)."""
        if self.group is None:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device(self.group, "cpu"))
        _dist().all_reduce(t, group=self.group)
        return float(t)

    # ----------------------------------------------------------------- internals
    def _raise_if_failed(self, failed: bool, error: BaseException | None, what: str) -> None:
        """After a collective that carried the flags: gather messages and raise everywhere."""
        dist = _dist()
        messages: list = [None] * self.size
        mine = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(messages, mine, group=self.group)
        if error is not None:
            raise error
        bad = [(r, m) for r, m in enumerate(messages) if m is not None]
        raise RankFailedError(
            f"{what} failed on rank(s) {[r for r, _ in bad]} of {self.size}: "
            + "; ".join(f"rank {r}: {m}" for r, m in bad)
        )


class _Agreement:
    def __init__(self, shards: ShardGroup, signature: str, device) -> None:
        self.shards, self.signature, self.device = shards, signature, device
        self.counts: list[float] = []
        self.totals: list[float] = []
        self.before: list[float] = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None and not isinstance(exc, Exception):
            return False  # KeyboardInterrupt etc.: no collective; the group timeout frees the others
        s = self.shards
        if s.group is None:
            if exc is None:
                self.totals, self.before = list(self.counts), [0.0] * len(self.counts)
            return False
        dist = _dist()
        row = [1.0 if exc is not None else 0.0, *_digest(self.signature)]
        counts = list(self.counts) if exc is None else []
        width = 1 + 3 + 8  # flag, digest, up to 8 counts (padded)
        row += counts + [0.0] * (8 - len(counts))
        device = _comm_device(s.group, self.device)
        mine = torch.tensor(row, dtype=torch.float64, device=device)
        rows = [torch.empty(width, dtype=torch.float64, device=device) for _ in range(s.size)]
        dist.all_gather(rows, mine, group=s.group)
        table = torch.stack(rows).cpu()
        if bool((table[:, 0] > 0).any()):
            s._raise_if_failed(exc is not None, exc, "Building the data-parallel operator")
        if not bool((table[:, 1:4] == table[0, 1:4]).all()):
            descriptions: list = [None] * s.size
            dist.all_gather_object(descriptions, self.signature, group=s.group)
            differing = [r for r, d in enumerate(descriptions) if d != descriptions[0]]
            raise ValueError(
                "The ranks describe different operators (every rank must pass the same class, loss, "
                f"reduction, mode and parameters): rank 0 has {descriptions[0]!r}; "
                + "; ".join(f"rank {r} has {descriptions[r]!r}" for r in differing)
            )
        k = len(self.counts)
        data = table[:, 4:4 + k]
        self.totals = data.sum(0).tolist()
        self.before = data[: s.rank].sum(0).tolist() if s.rank > 0 else [0.0] * k
        return False


class _Summed:
    def __init__(self, shards: ShardGroup, tensors: list[Tensor]) -> None:
        self.shards, self.tensors = shards, tensors

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        s = self.shards
        if s.group is None or (exc is not None and not isinstance(exc, Exception)):
            return False
        flag = 1.0 if exc is not None else 0.0
        if not self.tensors:  # nothing to sum: the flag alone
            self._flag_only(flag, exc)
            return False
        failed = _all_reduce_with_flag(self.tensors, flag, s.group)
        if failed:
            s._raise_if_failed(exc is not None, exc, "A data-parallel pass")
        return False

    def _flag_only(self, flag: float, exc) -> None:
        s = self.shards
        t = torch.tensor([flag], dtype=torch.float64, device=_comm_device(s.group, "cpu"))
        _dist().all_reduce(t, group=s.group)
        if float(t) > 0:
            s._raise_if_failed(exc is not None, exc, "A data-parallel pass")


def _all_reduce_with_flag(tensors: list[Tensor], flag: float, group) -> bool:
    """Sum ``tensors`` in place over ``group`` (one all_reduce per dtype, flag appended); any flag set?"""
    dist = _dist()
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    failed = False
    for i, (dtype, ts) in enumerate(by_dtype.items()):
        extra = torch.full((1,), flag if i == 0 else 0.0, dtype=dtype, device=ts[0].device)
        buf = torch.cat([t.reshape(-1) for t in ts] + [extra])
        dist.all_reduce(buf, group=group)
        if i == 0:
            failed = bool(buf[-1] > 0)  # one host read per pass
        if failed:
            return True
        offset = 0
        for t in ts:
            t.copy_(buf[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
    return failed


def all_reduce_sum_(tensors: Sequence[Tensor], group=None) -> None:
    """Sum ``tensors`` in place over the ranks of ``group``; a no-op for ``group=None``.

    One ``all_reduce`` per dtype of the tensors (they are concatenated).  For
    accumulations that are not product passes of an operator (BackPACK diagonals,
    K-FAC factors): call it on the per-batch sums once the loop over the local batches
    is done, with the ``group`` of the loop (``BatchLoop.shards.group``).  To make
    every rank fail when one raises inside the loop, prefer
    ``with loop.shards.summed(tensors): <loop>``.
    """
    if group is None:
        return
    ShardGroup(group)  # validates membership
    _all_reduce_with_flag(list(tensors), 0.0, group)


def is_rank_zero(process_group=None) -> bool:
    """``True`` on rank 0 of ``process_group`` (default: the world), and without ``torch.distributed``."""
    if not _initialised():
        return True
    return _dist().get_rank(process_group) == 0


def write_on_rank_zero(path, text: str, process_group=None) -> bool:
    """Write ``text`` to ``path`` on rank 0 only (the others return at once); ``True`` where written."""
    if not is_rank_zero(process_group):
        return False
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return True
