"""The one place that loops over data: batches, weights, model state, determinism checks.

Every model curvature operator (Hessian, GGN, Fisher) is a sum over batches of a
per-batch product.  :class:`EmpiricalRiskOperator` owns that sum:

* ``data`` is one batch ``(X, y)`` or any re-iterable of ``(X, y)`` batches (a
  DataLoader, a list).  Each batch is moved to the device of the parameters.
* Weights: the batch product is for the batch loss *as the loss function returns it*.
  With ``reduction="mean"`` batch ``b`` gets weight ``D_b / sum D``, where ``D_b`` is what
  PyTorch divides by (``B_b`` examples; for ``CrossEntropyLoss`` the non-ignored targets,
  class-weighted; see :func:`curvature.losses.mean_denominator`), so a product over
  unequal batches equals the product on the concatenated data set; with ``"sum"``
  every batch gets weight 1.
* Determinism: at construction one pass over the data (no model evaluation) records
  ``N`` and a fingerprint; every product pass recomputes it and raises ``RuntimeError``
  on a mismatch (shuffling with ``drop_last``, random augmentation, a changed data set).
  Hessian/GGN/empirical Fisher use an order-invariant fingerprint (a shuffled loader
  without ``drop_last`` gives the same matrix and is accepted); the Monte-Carlo Fisher,
  whose sampled labels are tied to batch positions, checks every batch in order.
* Model state: by default the model is evaluated in eval mode (BatchNorm uses its
  running statistics, dropout is off) and every module's ``training`` flag is restored
  afterwards; ``mode="train"`` uses batch statistics, refuses active dropout, and
  restores every buffer after each forward pass.  Products go through
  ``torch.autograd.grad``, never ``.backward()``, so ``.grad`` is untouched.
* Cache: with a single batch (a pair ``(X, y)``, or an iterable yielding one batch while
  the data check is on), the per-batch state (the graph of the gradient or of the
  output) is kept between products and rebuilt when a parameter or buffer changes.
  Changes are tracked by identity, ``data_ptr`` and ``_version`` (free) and, with
  ``cache_check="checksum"`` (default), by float64 sums of the tensors computed on their
  device and compared with one host sync per product: writes through ``.data``
  (``p.data.copy_(w)``) do not bump ``_version``.  ``cache_check="version"`` drops that
  sync (for GPU loops that never write through ``.data``); ``op.clear_cache()`` frees
  the state and ``cache=False`` disables it.
* Host syncs: a product pass reads the data fingerprints back once, at its end
  (float64 reductions stay on the device meanwhile).

Scaling out: the data-parallel reduction (``process_group=``, see
:mod:`curvature.distributed`) sits in :class:`BatchLoop` (``N``, batches and mean
denominators summed over ranks at construction, global batch indices) and around the
passes of :meth:`EmpiricalRiskOperator._block_products` and ``loss_and_gradient`` (one
``all_reduce`` of the accumulated result per pass); memory chunking
(splitting a large batch into micro-batches, or the columns of a block) belongs in
:meth:`EmpiricalRiskOperator._block_products`.  Nothing else loops over data
(``curvature.backpack`` iterates a :class:`BatchLoop` too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from . import distributed
from .linear_operator import LinearOperator
from .losses import loss_reduction, mean_denominator
from .params import unflatten

__all__ = ["EmpiricalRiskOperator", "BatchLoop", "resolve_params", "model_state", "check_loss"]


# ----------------------------------------------------------------------------- params
def resolve_params(model: nn.Module, params=None) -> tuple[list[str], list[Tensor]]:
    """Names and tensors of the parameters an operator is defined over.

    Args:
        model: the model.
        params: ``None`` (all parameters with ``requires_grad``, in ``model.parameters()``
            order), or a list of parameter tensors of ``model`` or of their names (as in
            ``model.named_parameters()``), kept in the given order.

    Raises:
        ValueError: no trainable parameters, a tensor that is not a parameter of the
            model, an unknown name, or duplicates.
    """
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError(
                "The model has no trainable parameters (every parameter has requires_grad=False); "
                "pass params= explicitly to choose which ones to differentiate."
            )
    else:
        if isinstance(params, (Tensor, str)):
            params = [params]
        params = list(params)
        if not params:
            raise ValueError("params is empty: pass at least one parameter (or None for all trainable ones).")
        by_id = {id(p): n for n, p in named}
        by_name = dict(named)
        chosen = []
        for p in params:
            if isinstance(p, str):
                if p not in by_name:
                    raise ValueError(f"Unknown parameter name {p!r}; the model has {list(by_name)}.")
                chosen.append((p, by_name[p]))
            elif isinstance(p, Tensor):
                if id(p) not in by_id:
                    raise ValueError(
                        f"A tensor of shape {tuple(p.shape)} in params is not a parameter of the model."
                    )
                chosen.append((by_id[id(p)], p))
            else:
                raise TypeError(f"params entries must be tensors or names, got {type(p).__name__}.")
        names = [n for n, _ in chosen]
        if len(set(names)) != len(names):
            raise ValueError(f"params contains duplicates: {names}.")
    dtypes = {p.dtype for _, p in chosen}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise TypeError(f"All parameters must share one floating dtype, got {sorted(map(str, dtypes))}.")
    return [n for n, _ in chosen], [p for _, p in chosen]


def check_loss(loss_fn) -> str | None:
    """The loss's reduction; raises for ``reduction='none'`` (a non-scalar loss)."""
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable as loss_fn(output, target).")
    red = loss_reduction(loss_fn)
    if red == "none":
        raise ValueError(
            "The loss must be a scalar: loss_fn has reduction='none'; use reduction='mean' or 'sum'."
        )
    return red


# ------------------------------------------------------------------------ model state
def _dropout_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]


@contextlib.contextmanager
def model_state(model: nn.Module, mode: str):
    """Evaluate ``model`` in ``mode`` ("eval" or "train"); restore flags (and buffers in train mode)."""
    flags = [(m, m.training) for m in model.modules()]
    saved = None
    if mode == "eval":
        model.eval()
    else:
        saved = [(b, b.detach().clone()) for b in model.buffers()]
        model.train()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
        if saved is not None:
            with torch.no_grad():
                for b, value in saved:
                    # through .data: no version bump, so graphs saving the buffer stay valid
                    b.data.copy_(value)


def _is_single_batch(data) -> bool:
    return (
        isinstance(data, (tuple, list)) and len(data) == 2
        and isinstance(data[0], Tensor) and isinstance(data[1], Tensor)
    )


def _fingerprint(X: Tensor, y: Tensor) -> Tensor:
    """``[sum of inputs, sum of |inputs|, sum of targets]`` as a float64 tensor on the batch's device.

    Reductions accumulate in float64 (``sum(dtype=...)``, ``vector_norm(..., dtype=...)``)
    without a float64 copy of the batch, and nothing is read back to the host here: a
    pass stacks these and reads them once (:meth:`BatchLoop._check_pass`).
    """
    X, y = X.detach(), y.detach()
    if X.dtype == torch.bool:
        abs_sum = X.sum(dtype=torch.float64)
    elif X.is_floating_point():
        abs_sum = torch.linalg.vector_norm(X, 1, dtype=torch.float64)
    else:
        abs_sum = X.abs().sum(dtype=torch.float64)
    return torch.stack([X.sum(dtype=torch.float64), abs_sum, y.sum(dtype=torch.float64)])


def _same(a: tuple, b: tuple) -> bool:
    """Fingerprints ``(size, sum, |sum|, target sum)`` agree (sizes exactly, sums to 1e-9 relative)."""
    if a[0] != b[0]:
        return False
    tol = 1e-9 * (a[2] + 1.0)
    return abs(a[1] - b[1]) <= tol and abs(a[2] - b[2]) <= tol and abs(a[3] - b[3]) <= 1e-9 * (abs(a[3]) + 1.0)


def _read(sizes: list[int], sums: list[Tensor], per_batch: bool) -> list[tuple]:
    """Host copies of fingerprints: one tuple per batch, or the total (order-invariant); one sync."""
    if not sums:
        return [] if per_batch else [(0, 0.0, 0.0, 0.0)]
    S = torch.stack(sums)
    if per_batch:
        return [(n, *row) for n, row in zip(sizes, S.tolist())]
    return [(sum(sizes), *S.sum(0).tolist())]


class BatchLoop:
    """Passes over ``data`` with the weight of each batch, checking every pass sees the same data.

    Iterating yields ``(batch_index, X, y, weight)`` with ``X, y`` on ``device`` and
    ``weight = B_b / N`` (``reduction="mean"``) or ``1`` (``"sum"``, or a single batch);
    a completed pass whose fingerprint differs from the construction scan raises
    ``RuntimeError``.  This is the one loop over data of the package: a data-parallel
    ``all_reduce`` across ranks (of the accumulated result and of ``N``) and memory
    chunking of large batches go here.

    Args:
        data: a batch ``(X, y)`` or a re-iterable of batches.
        device: where batches go (the parameters' device).
        reduction: ``"mean"``, ``"sum"`` or ``None`` (only allowed for a single batch).
        order_sensitive: compare every batch in order (MC Fisher) instead of an
            order-invariant total (a shuffled loader without ``drop_last`` passes).
        check: verify fingerprints (default ``True``).
        process_group: a ``torch.distributed`` group whose ranks hold shards (``None``:
            this process only); ``num_data``, ``num_batches`` and the denominators are
            then totals over ranks and yielded batch indices global.
        signature: what every rank's consumer must agree on (checked at construction).
    """

    def __init__(self, data, device, reduction: str | None, *, order_sensitive: bool = False,
                 check: bool = True, denominator=None, process_group=None, signature: str = "") -> None:
        self.data = data
        self.denominator = denominator if denominator is not None else (lambda X, y: float(X.shape[0]))
        self.device = torch.device(device)
        self.reduction = reduction
        self.order_sensitive = order_sensitive
        self.check = check
        self.single = _is_single_batch(data)
        if not self.single and not isinstance(data, Iterable):
            raise TypeError(f"data must be a batch (X, y) or an iterable of batches, got {type(data).__name__}.")
        if not self.single and isinstance(data, Iterator):
            raise TypeError("data is a one-shot iterator; pass a re-iterable (a list or a DataLoader).")
        sizes, sums, denominators = [], [], []
        # data parallel: N, batches and denominators summed over ranks (curvature.distributed)
        self.shards = distributed.ShardGroup(process_group)
        with self.shards.agreement(signature, self.device) as counts:
            for X, y in self._raw():  # one pass: fingerprints and the mean's denominators
                sizes.append(int(X.shape[0]))
                sums.append(_fingerprint(X, y))
                denominators.append(self.denominator(X, y) if reduction == "mean" else 1.0)
            counts.counts = [sum(sizes), len(sizes), float(sum(denominators))]
        self.local_num_batches = len(sizes)
        self.batch_offset = int(counts.before[1])  # global index of this rank's first batch
        if not counts.totals[0]:
            raise ValueError("data is empty: got no batches (or only empty ones).")
        if counts.totals[1] > 1 and reduction is None:
            raise ValueError(
                "Cannot tell how batch losses combine: loss_fn has no 'reduction' attribute; "
                "pass reduction='mean' or 'sum'."
            )
        self.num_data = int(counts.totals[0])  # over all ranks
        self.num_batches = int(counts.totals[1])
        # the mean's total denominator (examples, or non-ignored / class-weighted targets)
        self.total_denominator = float(counts.totals[2])
        self._batch_fps = _read(sizes, sums, per_batch=True)
        self._total_fp = _read(sizes, sums, per_batch=False)[0]

    def _raw(self) -> Iterable[tuple[Tensor, Tensor]]:
        for batch in ((self.data,) if self.single else self.data):
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError(
                    f"Each batch must be a pair (X, y); got {type(batch).__name__}"
                    f"{' of length %d' % len(batch) if isinstance(batch, (tuple, list)) else ''}."
                )
            X, y = batch
            yield X.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def weight(self, X: Tensor, y: Tensor) -> float:
        """``D_b / sum_b D_b`` for a mean (``D`` = :func:`~curvature.losses.mean_denominator`), else 1."""
        if self.reduction != "mean" or self.num_batches == 1:
            return 1.0
        return self.denominator(X, y) / self.total_denominator if self.total_denominator > 0 else 0.0

    def __iter__(self):
        checking = self.check and not self.single
        sizes, sums = [], []  # fingerprints stay on the device until the pass ends (one sync per pass)
        for b, (X, y) in enumerate(self._raw()):
            if checking:
                sizes.append(int(X.shape[0]))
                sums.append(_fingerprint(X, y))
            if X.shape[0] == 0:
                continue
            w = self.weight(X, y)
            if w == 0.0:  # nothing to average in this batch (e.g. every target ignored)
                continue
            yield b + self.batch_offset, X, y, w
        if checking:
            self._check_pass(sizes, sums)

    def _check_pass(self, sizes: list[int], sums: list[Tensor]) -> None:
        if self.order_sensitive:
            fps = _read(sizes, sums, per_batch=True)
            ok = len(fps) == len(self._batch_fps) and all(_same(a, b) for a, b in zip(fps, self._batch_fps))
            what = "the same batches in the same order on every pass (its sampled labels are tied to batch positions)"
        else:
            ok = _same(_read(sizes, sums, per_batch=False)[0], self._total_fp)
            what = "the same data set on every pass"
        if not ok:
            raise RuntimeError(
                f"The data changed between passes; the curvature needs {what}. "
                "Check for shuffling (shuffle=True), drop_last=True, random data augmentation, "
                "or a data set modified in place; use a deterministic loader or pass check_data=False."
            )


class EmpiricalRiskOperator(LinearOperator):
    """Base class: a curvature matrix of ``L(theta) = sum_b w_b loss_fn(model(X_b), y_b)``.

    Subclasses implement ``_build_state(X, y, batch_index)`` (whatever the products on
    one batch reuse, e.g. a gradient graph) and ``_apply_state(state, V, idx)`` (the
    batch product ``[m, k]`` for ``V`` of shape ``[m, k]``, restricted to the diagonal
    block of the parameters ``idx``, all of them for ``idx=None``).

    Args:
        model: a ``torch.nn.Module`` mapping ``X`` to the output ``z``.
        loss_fn: ``loss_fn(z, y)`` returning a scalar (reduction "mean" or "sum").
        data: one batch ``(X, y)`` or an iterable of batches (re-iterable: every
            product makes one pass).
        params: parameters to differentiate (see :func:`resolve_params`).
        mode: ``"eval"`` (default: running statistics, no dropout) or ``"train"``.
        reduction: only for loss functions without a ``reduction`` attribute and more
            than one batch: how batch losses combine (``"mean"`` or ``"sum"``).
        cache: keep the single-batch state between products (default ``True``).
        cache_check: how the cache notices parameter changes: ``"checksum"`` (default:
            identity, ``_version`` and on-device float64 sums, one sync per product;
            catches writes through ``.data``) or ``"version"`` (identity and
            ``_version`` only, no sync).
        check_data: verify each pass sees the same data (default ``True``).
        process_group: ``None`` (default: this process's data), ``"local"``, or a
            ``torch.distributed`` group whose ranks each hold a shard of the data: the
            operator is then the curvature of the union, identical on every rank (see
            :mod:`curvature.distributed`).  A ``DistributedDataParallel`` model is
            unwrapped to its ``.module``.
    """

    _order_sensitive = False  # per-batch fingerprints (MC Fisher) instead of a global one

    def __init__(
        self,
        model: nn.Module,
        loss_fn,
        data,
        params=None,
        *,
        mode: str = "eval",
        reduction: str | None = None,
        cache: bool = True,
        cache_check: str = "checksum",
        check_data: bool = True,
        process_group=None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        model, params, group = distributed.prepare(model, data, process_group, params)
        if mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}.")
        if cache_check not in ("checksum", "version"):
            raise ValueError(f"cache_check must be 'checksum' or 'version', got {cache_check!r}.")
        red = check_loss(loss_fn)
        if reduction is not None and reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
        if mode == "train" and _dropout_modules(model):
            raise ValueError(
                f"mode='train' with active dropout ({_dropout_modules(model)}) gives a random matrix; "
                "use mode='eval' (the default) or set dropout p=0."
            )
        self.model = model
        self.loss_fn = loss_fn
        self.mode = mode
        self.reduction = red if red is not None else reduction
        self.param_names, self.params = resolve_params(model, params)
        p0 = self.params[0]
        n = sum(p.numel() for p in self.params)
        super().__init__(
            (n, n), dtype=p0.dtype, device=p0.device, is_symmetric=True,
            param_shapes=[p.shape for p in self.params],
        )
        self.cache = bool(cache)
        self.cache_check = cache_check
        self.check_data = bool(check_data)
        self.data = data
        self._state = None
        self._state_key = None
        self._state_sum = None
        self._loop = BatchLoop(data, self.device, self.reduction, order_sensitive=self._order_sensitive,
                               check=self.check_data,
                               denominator=lambda X, y: mean_denominator(loss_fn, y, X.shape[0]),
                               process_group=group, signature=distributed.describe_operator(self))
        self._single = self._loop.single
        # The per-batch state is cached for one batch: a pair (X, y), or an iterable yielding exactly
        # one batch when the data check is on (a changed batch then fails the pass before the product
        # is returned, so a stale cached state is never used silently).
        self._cacheable = self._single or (self._loop.local_num_batches == 1 and self.check_data)
        self.num_data = self._loop.num_data
        self.num_batches = self._loop.num_batches

    # ----------------------------------------------------------------- model
    def _forward(self, X: Tensor) -> tuple[list[Tensor], Tensor]:
        """Model output with fresh leaves for ``self.params`` (the model is not modified)."""
        leaves = [p.detach().requires_grad_(True) for p in self.params]
        chosen = set(self.param_names)
        tensors = {n: p.detach() for n, p in self.model.named_parameters() if n not in chosen}
        tensors.update(zip(self.param_names, leaves))
        z = torch.func.functional_call(self.model, tensors, (X,))
        if not isinstance(z, Tensor):
            raise TypeError(f"The model must return a tensor, got {type(z).__name__}.")
        return leaves, z

    def _loss(self, z: Tensor, y: Tensor) -> Tensor:
        loss = self.loss_fn(z, y)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                "The loss must be a scalar (reduction 'mean' or 'sum'); loss_fn returned "
                f"{'shape ' + str(tuple(loss.shape)) if isinstance(loss, Tensor) else type(loss).__name__}."
            )
        return loss.reshape(())

    def _tracked(self) -> list[Tensor]:
        tensors = list(self.model.parameters())
        if self.mode == "eval":
            tensors += list(self.model.buffers())
        return tensors

    def _key(self) -> tuple:
        """Identity, ``_version`` and ``data_ptr`` of every parameter (and buffer in eval mode): no sync.

        Catches optimizer steps and other in-place updates (``p.add_`` under ``no_grad``),
        ``p.data = new`` and replaced modules.  It misses in-place writes *through*
        ``.data`` (``p.data.copy_(w)``, ``p.data.mul_(c)``), which do not bump
        ``p._version`` (checked in torch 2.13): :meth:`_checksum` covers those.
        """
        return tuple((id(t), t._version, t.data_ptr()) for t in self._tracked())

    def _checksum(self) -> Tensor:
        """Float64 sums of the tracked floating tensors, stacked on their device (no sync)."""
        with torch.no_grad():
            sums = [t.detach().sum(dtype=torch.float64).to(self.device) for t in self._tracked()
                    if t.is_floating_point()]
            return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.float64, device=self.device)

    def _cache_valid(self, key: tuple) -> bool:
        if self._state is None or key != self._state_key:
            return False
        if self.cache_check == "version":
            return True
        # Trade-off: one device sync per product, to catch writes through .data that _version misses.
        sums = self._checksum()
        return sums.shape == self._state_sum.shape and bool(torch.equal(sums, self._state_sum))

    def clear_cache(self) -> None:
        """Free the cached single-batch state (the next product rebuilds it)."""
        self._state = None
        self._state_key = None
        self._state_sum = None

    # -------------------------------------------------------------- products
    def _build_state(self, X: Tensor, y: Tensor, batch_index: int):
        raise NotImplementedError

    def _apply_state(self, state, V: Tensor, idx: list[int] | None = None) -> Tensor:
        """Batch product restricted to the parameters ``idx`` (rows and columns); all if ``None``."""
        raise NotImplementedError

    def _get_state(self, X: Tensor, y: Tensor, batch_index: int):
        """The per-batch state, from the cache for a single batch."""
        if self._cacheable and self.cache:
            key = self._key()
            if not self._cache_valid(key):
                self.clear_cache()
                sums = self._checksum() if self.cache_check == "checksum" else None
                with torch.enable_grad(), model_state(self.model, self.mode):
                    self._state = self._build_state(X, y, batch_index)
                self._state_key, self._state_sum = key, sums
            return self._state
        with torch.enable_grad(), model_state(self.model, self.mode):
            return self._build_state(X, y, batch_index)

    def _block_products(self, blocks: Sequence[tuple[list[int] | None, Tensor]]) -> list[Tensor]:
        """Products of diagonal blocks ``[(param indices or None, V_b)]`` in one pass over the data.

        Memory chunking (micro-batches, or slices of the columns) would go here.
        """
        outs = [torch.zeros_like(V) for _, V in blocks]
        with self._loop.shards.summed(outs):  # data parallel: one all_reduce over ranks (and error flag)
            for b, X, y, w in self._loop:
                state = self._get_state(X, y, b)
                with torch.enable_grad():
                    for out, (idx, V) in zip(outs, blocks):
                        out.add_(self._apply_state(state, V, idx), alpha=w)
        return outs

    def _matmat(self, V: Tensor) -> Tensor:
        return self._block_products([(None, V)])[0]

    # ---------------------------------------------------------------- extras
    def loss_and_gradient(self) -> tuple[Tensor, Tensor]:
        """The loss over all data and its gradient w.r.t. ``params`` (flat ``[n]``). Costs one pass."""
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        grad = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        with self._loop.shards.summed([total, grad]):  # data parallel: summed over ranks
            for _, X, y, w in self._loop:
                with torch.enable_grad(), model_state(self.model, self.mode):
                    leaves, z = self._forward(X)
                    loss = self._loss(z, y)
                    gs = torch.autograd.grad(loss, leaves, allow_unused=True)
                total += w * loss.detach()
                grad += w * torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                       for g, p in zip(gs, leaves)])
        return total, grad

    def unflatten(self, v: Tensor) -> list[Tensor]:
        """Split a flat ``[n]`` / ``[n, k]`` tensor into parameter-shaped pieces."""
        return unflatten(v, self.param_shapes)
