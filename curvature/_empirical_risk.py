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
``all_reduce`` of the accumulated result per pass).  Nothing else loops over data
(``curvature.backpack`` iterates a :class:`BatchLoop` too).

Bounded memory (the operator options ``micro_batch_size=`` and ``max_block_bytes=``, applied
in :meth:`EmpiricalRiskOperator._block_products` and ``loss_and_gradient``):

* ``micro_batch_size=m`` splits every batch into micro-batches of at most ``m`` examples
  (:meth:`BatchLoop.micro_batches`; every tensor whose first dimension is the batch size is
  sliced, others are passed whole) and weights micro-batch ``j`` by ``D_j / sum D`` for a
  mean (``D`` the mean's denominator: examples, counted tokens, class weights), ``1`` for a
  sum, so the products are the same matrix (to rounding) with the graph of ``m`` examples
  alive at a time instead of a whole batch.  Refused in ``mode="train"`` with BatchNorm
  (batch statistics depend on the split).  A split batch is not cached (every product
  rebuilds each micro-batch's graph: about one forward and one backward per micro-batch
  more per product).  The MC Fisher draws its labels per micro-batch (a different, equally
  valid fixed sample).
* ``max_block_bytes=b`` (default 1 GiB, ``None``: unbounded) multiplies a block ``[n, k]`` in
  column chunks of ``k_c = max(1, b // c)`` columns through the same per-batch state, with
  ``c`` the estimated working set of one column (:meth:`EmpiricalRiskOperator._column_bytes`:
  ``4 n`` entries for the column's contiguous copy, its product and autograd's pieces, plus
  ``2`` output-sized tensors per column for the GGN / Fisher).  Chunking costs no extra
  forward or backward passes.  The input block and the ``[n, k]`` result are not counted.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .batches import BatchAdapter, ModelInputs, tensor_leaves, to_device
from . import distributed
from .kernels import derivative_kernels, refuse_once_differentiable
from .linear_operator import LinearOperator
from .losses import MeanDenominatorError, loss_reduction, mean_denominator
from .params import unflatten

__all__ = ["EmpiricalRiskOperator", "BatchLoop", "resolve_params", "model_state", "check_loss", "forward"]


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
    """Evaluate ``model`` in ``mode`` ("eval" or "train"); restore flags (and buffers in train mode).

    ``nn.Embedding(sparse=True)`` modules produce dense gradients meanwhile (the same
    numbers; curvature products need dense gradient tensors); their flag is restored.
    """
    flags = [(m, m.training) for m in model.modules()]
    sparse = [m for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
    saved = None
    if mode == "eval":
        model.eval()
    else:
        saved = [(b, b.detach().clone()) for b in model.buffers()]
        model.train()
    for m in sparse:
        m.sparse = False
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
        for m in sparse:
            m.sparse = True
        if saved is not None:
            with torch.no_grad():
                for b, value in saved:
                    # through .data: no version bump, so graphs saving the buffer stay valid
                    b.data.copy_(value)


def _rng_states(cuda_devices: list) -> list[Tensor]:
    return [torch.get_rng_state()] + [torch.cuda.get_rng_state(d) for d in cuda_devices]


def _set_rng_states(states: list[Tensor], cuda_devices: list) -> None:
    torch.set_rng_state(states[0])
    for d, s in zip(cuda_devices, states[1:]):
        torch.cuda.set_rng_state(s, d)


def _same_state(a: Tensor, b: Tensor) -> bool:
    """RNG states equal: compared on the host (no dispatch; inside torch.func transforms, torch.equal)."""
    try:
        return np.array_equal(a.numpy(), b.numpy())
    except RuntimeError:  # under torch.func.jvp / grad the state has no plain storage
        return bool(torch.equal(a, b))


def _cuda_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


def forward(model: nn.Module, inputs: ModelInputs, adapter: BatchAdapter, device: torch.device,
            tensors: dict | None = None) -> Tensor:
    """The prediction of ``model`` on ``inputs``, refusing forwards that draw random numbers.

    The model is called through ``torch.func.functional_call`` with ``tensors`` when given
    (not modified) and the prediction read by ``adapter``.  If the forward advanced torch's
    global RNG (CPU, or the CUDA one of ``device``): dropout, attention dropout
    (``scaled_dot_product_attention(dropout_p>0)``), noise layers, any random module: the
    RNG is put back and ``ValueError`` is raised, since the curvature would be a random
    matrix.  Cost: two host copies of the RNG state (5 KB) per forward; no device sync.
    A module drawing from its own ``torch.Generator`` is not detected.
    """
    cuda = _cuda_devices(device)
    before = _rng_states(cuda)
    out = inputs.call(model, tensors)
    after = _rng_states(cuda)
    if any(not _same_state(a, b) for a, b in zip(before, after)):
        _set_rng_states(before, cuda)
        raise ValueError(
            "The model's forward draws random numbers from torch's global generator (active dropout, attention "
            "dropout such as MultiheadAttention(dropout>0) or scaled_dot_product_attention(dropout_p>0) in train "
            "mode, a noise layer, ...): the curvature would be a random matrix. Use mode='eval' (the default) or "
            "set every dropout probability to 0."
        )
    z = adapter.prediction(out)
    return z


def _refuse_inference_mode() -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "Curvature products and gradients need autograd, which torch.inference_mode() disables (tensors "
            "created in inference mode cannot be differentiated). Call this outside the inference_mode block "
            "(torch.no_grad() is fine: products re-enable gradients internally)."
        )


def _positive_int_or_none(value, name: str) -> int | None:
    """``value`` as a positive ``int``, or ``None``; ``ValueError`` / ``TypeError`` naming ``name`` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive integer or None, got {type(value).__name__}.")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {value}.")
    return int(value)


def _is_single_batch(data) -> bool:
    """One batch: a Mapping, or a tuple/list of at least two tensors (otherwise: an iterable of batches)."""
    if isinstance(data, Mapping):
        return True
    return isinstance(data, (tuple, list)) and len(data) >= 2 and all(isinstance(t, Tensor) for t in data)


# ---------------------------------------------------------------- data fingerprints
# A batch's fingerprint: for inputs and for targets, over every tensor t (leaf number l) with
# rows x_n = t[n].reshape(-1): projections p_n = <r_l, x_n> with fixed pseudo-random r_l, and
#   [sum_n p_n, sum_n p_n^2, sum_n c_n p_n, sum_n |p_n|]      (c: fixed random position weights)
# The first two and the last do not depend on the order of examples (summed over batches they
# do not depend on how examples are split into batches); the third does.
_FP_WIDTH = 4  # per group (inputs, targets)
_WEIGHTS: dict[tuple, Tensor] = {}


def _weights(length: int, device: torch.device, dtype: torch.dtype, stream: int) -> Tensor:
    """Fixed weights in [-1, -0.25] u [0.25, 1] of ``length``, the same on every call (cached).

    The weights of a length are a prefix of those of a power of two, generated on the CPU
    from a fixed seed (the global RNG is not touched) and moved to ``device`` once.
    """
    key = (device, dtype, stream, length)
    w = _WEIGHTS.get(key)
    if w is None:
        size = 1 << max(int(length) - 1, 0).bit_length()
        g = torch.Generator().manual_seed(7919 * stream + size)
        u = torch.rand(size, generator=g, dtype=torch.float64)[:length]
        w = torch.where(u < 0.5, -1 + 1.5 * u, 0.25 + 1.5 * (u - 0.5)).to(device=device, dtype=dtype)
        _WEIGHTS[key] = w
    return w


def _weight_dtype(t: Tensor) -> torch.dtype:
    """The dtype products with weights are formed in: ``t``'s for float32/64, float32 for half, else float64."""
    if t.dtype in (torch.float32, torch.float64):
        return t.dtype
    return torch.float32 if t.is_floating_point() else torch.float64


def _projection(t: Tensor) -> Tensor:
    """``sum_i r_i t_i`` (float64 scalar on ``t``'s device) with fixed pseudo-random ``r``; no sync.

    Sum-preserving changes (swapped rows, a permutation, a sign flip) change it.  Cost: one
    elementwise product and one reduction over ``t``.
    """
    flat = t.detach().reshape(-1)
    w = _weights(flat.numel(), t.device, _weight_dtype(t), 0)
    if t.dtype == torch.float64:
        return torch.dot(flat, w)
    return (flat * w).sum(dtype=torch.float64)


def _sketch(t: Tensor, stream: int) -> Tensor:
    """``[sum p, sum p^2, sum c p, sum |p|]`` (float64, on ``t``'s device) of one tensor's rows.

    The elementwise products are formed in ``t``'s floating dtype (float64 for integer and
    bool data, float32 for half precision) and summed in float64: no float64 copy of a
    float32 batch.  Cost: about two reads of ``t``; no host sync.
    """
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.numel() == 0:
        return torch.zeros(_FP_WIDTH, dtype=torch.float64, device=t.device)
    rows = t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1)
    p = (rows * _weights(rows.shape[1], t.device, _weight_dtype(t), 2 * stream)).sum(1, dtype=torch.float64)
    c = _weights(rows.shape[0], t.device, torch.float64, 2 * stream + 1)
    return torch.stack([p, p * p, c * p, p.abs()]).sum(1)


def _group_sketch(tensors: list[Tensor], device: torch.device) -> Tensor:
    parts = [_sketch(t, leaf) for leaf, t in enumerate(tensors)]
    parts = [p if p.device == device else p.to(device) for p in parts]
    if not parts:
        return torch.zeros(_FP_WIDTH, dtype=torch.float64, device=device)
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)


def _fingerprint(inputs: ModelInputs, y, device: torch.device) -> Tensor:
    """``[inputs' 4 sketch values, targets' 4]`` as a float64 tensor on ``device`` (no host sync).

    A pass stacks these and reads them back once (:meth:`BatchLoop._check_pass`).  The
    same pass detects NaN / inf in a batch (a non-finite sketch).
    """
    return torch.cat([_group_sketch(tensor_leaves((inputs.args, inputs.kwargs)), device),
                      _group_sketch(tensor_leaves(y), device)])


def _finite_sums(inputs: ModelInputs, y, device: torch.device) -> Tensor:
    """``[inputs' sum, targets' sum]`` (float64 on ``device``): sums of the floating leaves, in their dtype.

    The cheap NaN / inf screen of a single batch (which has no pass-to-pass check, so
    no fingerprint is needed): a finite sum means finite entries; a non-finite one means
    NaN / inf, or an overflowing sum of finite entries, which :class:`BatchLoop` then tells
    apart entry by entry.  Cost: one reduction per floating leaf; no host sync.
    """
    out = []
    for leaves in _groups(inputs, y):
        parts = [(torch.view_as_real(t) if t.is_complex() else t).detach().sum().to(device, torch.float64)
                 for t in leaves if t.is_floating_point() or t.is_complex()]
        out.append(torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float64, device=device))
    return torch.stack(out)


def _groups(inputs: ModelInputs, y) -> tuple[list[Tensor], list[Tensor]]:
    return tensor_leaves((inputs.args, inputs.kwargs)), tensor_leaves(y)


def _close(a: float, b: float, scale: float) -> bool:
    return abs(a - b) <= 1e-9 * (abs(scale) + 1.0)


def _same(a: tuple, b: tuple, positional: bool) -> bool:
    """Fingerprints ``(size, *8 sketch values)`` agree (sizes exactly, sketches to 1e-9 relative)."""
    if a[0] != b[0]:
        return False
    for g in (1, 1 + _FP_WIDTH):
        s, sq, pos, ab = a[g:g + _FP_WIDTH]
        s2, sq2, pos2, ab2 = b[g:g + _FP_WIDTH]
        if not (_close(s, s2, ab) and _close(sq, sq2, sq) and _close(ab, ab2, ab)):
            return False
        if positional and not _close(pos, pos2, ab):
            return False
    return True


def _read(sizes: list[int], sums: list[Tensor]) -> list[tuple]:
    """Host copies of the per-batch fingerprints ``(size, *sketch)``; one sync."""
    if not sums:
        return []
    return [(n, *row) for n, row in zip(sizes, torch.stack(sums).tolist())]


def _total(fps: list[tuple]) -> tuple:
    """The order-invariant total of per-batch fingerprints (positional entries are meaningless here)."""
    if not fps:
        return (0,) + (0.0,) * (2 * _FP_WIDTH)
    return (sum(f[0] for f in fps), *[float(math.fsum(col)) for col in list(zip(*fps))[1:]])


def _nonfinite_data(batch_index: int, what: str) -> ValueError:
    return ValueError(f"Batch {batch_index} contains NaN or inf in its {what}: the curvature would be NaN. "
                      "Clean or filter the data (torch.isfinite) before computing curvature.")


def _check_finite(fps: list[tuple], first_index: int = 0) -> None:
    """``ValueError`` naming the first batch whose inputs or targets hold NaN / inf."""
    for b, fp in enumerate(fps, start=first_index):
        for g, what in ((1, "inputs"), (1 + _FP_WIDTH, "targets")):
            if not (math.isfinite(fp[g]) and math.isfinite(fp[g + _FP_WIDTH - 1])):
                raise _nonfinite_data(b, what)


class _PrivateRNG:
    """Runs data-loading calls on a private continuation of torch's global RNG (CPU + ``device``'s CUDA).

    Iterating a DataLoader draws from the global RNG (its base seed, a shuffling sampler,
    augmentations) even with ``shuffle=False``.  Each call into the data runs with the private
    state (starting as the caller's state when the pass begins) and puts the caller's state
    back before returning, so a pass leaves the global RNG as it found it, also when it is
    abandoned half-way.  Cost: two RNG state copies (5 KB) per batch.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = _cuda_devices(device)
        self.state = None

    def call(self, fn):
        caller = _rng_states(self.cuda)
        if self.state is not None:
            _set_rng_states(self.state, self.cuda)
        try:
            return fn()
        finally:
            self.state = _rng_states(self.cuda)
            _set_rng_states(caller, self.cuda)


_DONE = object()


def _rows(obj, start: int, stop: int, n: int):
    """``obj`` with every nested tensor whose first dimension is ``n`` cut to rows ``[start, stop)``."""
    if isinstance(obj, Tensor):
        return obj[start:stop] if obj.dim() and obj.shape[0] == n else obj
    if isinstance(obj, Mapping):
        return {k: _rows(v, start, stop, n) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        cut = [_rows(v, start, stop, n) for v in obj]
        return tuple(cut) if isinstance(obj, tuple) else cut
    return obj


class BatchLoop:
    """Passes over ``data`` with the weight of each batch, checking every pass sees the same data.

    Iterating yields ``(batch_index, inputs, y, weight)`` with ``inputs`` a
    :class:`~curvature.batches.ModelInputs` (``model(*inputs.args, **inputs.kwargs)``,
    ``inputs.batch_size`` examples) and the target ``y``, both on ``device``, read from each
    batch by ``adapter`` (:class:`~curvature.batches.BatchAdapter`: pairs ``(X, y)``,
    tuples ``(X1, ..., y)``, Mappings with ``"labels"``), and ``weight = D_b / sum D``
    (``reduction="mean"``) or ``1`` (``"sum"``, or a single batch).  This is the one loop over
    data of the package: a data-parallel ``all_reduce`` across ranks (of the accumulated
    result and of ``N``) and memory chunking of large batches go here.

    Data check (``check=True``): the construction scan and every pass compute a fingerprint
    of each batch (fixed random projections of every example's inputs and targets, see
    :func:`_fingerprint`; read back once per pass) and a completed pass that differs raises
    ``RuntimeError``.  What is compared:

    * ``order_sensitive`` (MC Fisher: sampled labels are tied to positions): every batch in
      order, including the order of examples inside it;
    * ``batch_sensitive`` (``mode="train"``: BatchNorm statistics depend on the batch): the
      collection of batches (any order of batches; a reshuffle of examples across batches
      is refused, a permutation inside a batch is accepted);
    * otherwise the data set as a whole (a shuffled loader without ``drop_last`` is accepted).

    Detected: changed values (also sum-preserving ones: a horizontal flip, swapped entries,
    moved examples), changed batch sizes or counts, NaN / inf (``ValueError`` naming the batch
    and inputs or targets, also at construction).  Not detected: changes below 1e-9 relative
    to the batch's scale, changes to non-tensor parts of a batch, and what the accepted
    reorderings above allow.  A single batch (a pair ``(X, y)``, not a list of batches) has
    nothing to compare between passes: its construction scan only screens it for NaN / inf
    (one sum per floating tensor, :func:`_finite_sums`).  Passes leave torch's global RNG as they found it
    (:class:`_PrivateRNG`).

    Args:
        data: one batch (a Mapping, or a tuple/list of tensors) or a re-iterable of batches.
        device: where batches go (the parameters' device).
        reduction: ``"mean"``, ``"sum"`` or ``None`` (only allowed for a single batch).
        order_sensitive, batch_sensitive: see above.
        check: verify fingerprints (default ``True``).
        denominator: ``denominator(inputs, y)``, the mean's denominator of a batch
            (default ``inputs.batch_size``).
        adapter: a :class:`~curvature.batches.BatchAdapter` (default ``BatchAdapter()``).
        process_group: a ``torch.distributed`` group whose ranks hold shards (``None``:
            this process only); ``num_data``, ``num_batches`` and the denominators are
            then totals over ranks and yielded batch indices global.
        signature: what every rank's consumer must agree on (checked at construction).
    """

    def __init__(self, data, device, reduction: str | None, *, order_sensitive: bool = False,
                 batch_sensitive: bool = False, check: bool = True, denominator=None,
                 adapter: BatchAdapter | None = None, process_group=None, signature: str = "") -> None:
        self.data = data
        self.adapter = adapter if adapter is not None else BatchAdapter()
        if not isinstance(self.adapter, BatchAdapter):
            raise TypeError(f"adapter must be a curvature.BatchAdapter, got {type(self.adapter).__name__}.")
        self.denominator = denominator if denominator is not None else (lambda X, y: float(X.batch_size))
        self.device = torch.device(device)
        self.reduction = reduction
        self.order_sensitive = order_sensitive
        self.batch_sensitive = batch_sensitive
        self.check = check
        self.single = _is_single_batch(data)
        if not self.single and not isinstance(data, Iterable):
            raise TypeError(f"data must be a batch (X, y) or an iterable of batches, got {type(data).__name__}.")
        if not self.single and isinstance(data, Iterator):
            raise TypeError("data is a one-shot iterator; pass a re-iterable (a list or a DataLoader).")
        sizes, sums, denominators, refusal = [], [], [], None
        # data parallel: N, batches and denominators summed over ranks (curvature.distributed)
        self.shards = distributed.ShardGroup(process_group)
        with self.shards.agreement(signature, self.device) as counts:
            for X, y in self._raw():  # one pass: fingerprints and the mean's denominators
                sizes.append(X.batch_size)
                # a single batch is never compared between passes: a NaN / inf screen suffices
                sums.append(_finite_sums(X, y, self.device) if self.single else _fingerprint(X, y, self.device))
                try:
                    denominators.append(self.denominator(X, y) if reduction == "mean" else 1.0)
                except MeanDenominatorError as err:  # fatal only when batches must be combined
                    refusal = err
                    denominators.append(0.0)
            counts.counts = [sum(sizes), len(sizes), float(sum(denominators))]
        self.local_num_batches = len(sizes)
        self.max_batch_size = max(sizes, default=0)  # local, for the micro-batch split
        self.denominator_error = refusal  # a mean whose denominator is unknown (micro-batches need it)
        self.batch_offset = int(counts.before[1])  # global index of this rank's first batch
        if not counts.totals[0]:
            raise ValueError("data is empty: got no batches (or only empty ones).")
        if refusal is not None and counts.totals[1] > 1:
            raise refusal
        if counts.totals[1] > 1 and reduction is None:
            raise ValueError(
                "Cannot tell how batch losses combine: loss_fn has no 'reduction' attribute; "
                "pass reduction='mean' or 'sum'."
            )
        self.num_data = int(counts.totals[0])  # over all ranks
        self.num_batches = int(counts.totals[1])
        # the mean's total denominator (examples, or non-ignored / class-weighted targets)
        self.total_denominator = float(counts.totals[2])
        if self.single:
            if not all(math.isfinite(v) for v in torch.stack(sums).view(-1).tolist()):  # NaN / inf, or overflow
                for leaves, what in zip(_groups(X, y), ("inputs", "targets")):
                    if not all(bool(torch.isfinite(t).all()) for t in leaves):
                        raise _nonfinite_data(0, what)
            self._batch_fps = self._total_fp = None  # nothing to compare: a single batch's passes are not checked
        else:
            self._batch_fps = _read(sizes, sums)
            _check_finite(self._batch_fps)
            self._total_fp = _total(self._batch_fps)

    def _raw(self) -> Iterable[tuple[ModelInputs, object]]:
        """``(inputs, target)`` of every batch, on the device; data loading on a private RNG."""
        if self.single or isinstance(self.data, (tuple, list)):  # no RNG involved
            batches = iter((self.data,) if self.single else self.data)
            fetch = lambda: next(batches, _DONE)  # noqa: E731
        else:
            rng = _PrivateRNG(self.device)
            batches = rng.call(lambda: iter(self.data))
            fetch = lambda: rng.call(lambda: next(batches, _DONE))  # noqa: E731
        while True:
            batch = fetch()
            if batch is _DONE:
                return
            inputs, y = self.adapter.split(batch)
            inputs = ModelInputs(to_device(inputs.args, self.device), to_device(inputs.kwargs, self.device),
                                 inputs.batch_size)
            yield inputs, to_device(y, self.device)

    def weight(self, X: ModelInputs, y) -> float:
        """``D_b / sum_b D_b`` for a mean (``D`` = :func:`~curvature.losses.mean_denominator`), else 1."""
        if self.reduction != "mean" or self.num_batches == 1:
            return 1.0
        return self.denominator(X, y) / self.total_denominator if self.total_denominator > 0 else 0.0

    def micro_batches(self, X: ModelInputs, y, weight: float, size: int | None):
        """Split one yielded batch into micro-batches of at most ``size`` examples, re-weighted.

        Yields ``(j, X_j, y_j, w_j)``: ``j`` the micro-batch number (``None`` when the batch
        is not split: ``size`` is ``None`` or at least the batch size), rows ``[j size, (j + 1)
        size)`` of every tensor in the inputs and the target whose first dimension is the
        batch size (others whole), and ``w_j = D_j / sum D`` for a mean (the batch's share
        of the data set's mean, ``D`` = the mean's denominator), ``weight`` for a sum, so
        ``sum_j w_j loss(X_j, y_j) = weight * loss(X, y)``.  Micro-batches with ``D_j = 0``
        (every target ignored) are skipped.  Cost: views, no copies; for losses whose
        denominator depends on the targets (ignored tokens, class weights) one host read
        per micro-batch.
        """
        n = X.batch_size
        if size is None or n <= size:
            yield None, X, y, weight
            return
        for j, start in enumerate(range(0, n, size)):
            stop = min(start + size, n)
            Xj = ModelInputs(_rows(X.args, start, stop, n), _rows(X.kwargs, start, stop, n), stop - start)
            yj = _rows(y, start, stop, n)
            if self.reduction == "mean":
                d = self.denominator(Xj, yj)
                if d == 0 or self.total_denominator <= 0:
                    continue
                wj = d / self.total_denominator
            else:
                wj = weight
            yield j, Xj, yj, wj

    def __iter__(self):
        _refuse_inference_mode()
        checking = self.check and not self.single
        sizes, sums = [], []  # fingerprints stay on the device until the pass ends (one sync per pass)
        for b, (X, y) in enumerate(self._raw()):
            if checking:
                sizes.append(X.batch_size)
                sums.append(_fingerprint(X, y, self.device))
            if X.batch_size == 0:
                continue
            w = self.weight(X, y)
            if w == 0.0:  # nothing to average in this batch (e.g. every target ignored)
                continue
            yield b + self.batch_offset, X, y, w
        if checking:
            self._check_pass(sizes, sums)

    def _check_pass(self, sizes: list[int], sums: list[Tensor]) -> None:
        fps = _read(sizes, sums)
        _check_finite(fps)
        ref = self._batch_fps
        if self.order_sensitive:
            ok = len(fps) == len(ref) and all(_same(a, b, True) for a, b in zip(fps, ref))
            what = "the same batches in the same order on every pass (its sampled labels are tied to batch positions)"
        elif self.batch_sensitive:
            key = lambda f: (f[0], f[1], f[1 + _FP_WIDTH])  # noqa: E731
            ok = len(fps) == len(ref) and all(_same(a, b, False) for a, b in zip(sorted(fps, key=key),
                                                                                 sorted(ref, key=key)))
            what = "the same batches on every pass (mode='train': batch statistics depend on the batch composition)"
        else:
            ok = _same(_total(fps), self._total_fp, False)
            what = "the same data set on every pass"
        if not ok:
            raise RuntimeError(
                f"The data changed between passes; the curvature needs {what}. "
                "Check for shuffling (shuffle=True), drop_last=True, random data augmentation, "
                "or a data set modified in place; use a deterministic loader or pass check_data=False."
            )


class _DifferentiableProducts(torch.autograd.Function):
    """Block products that autograd differentiates w.r.t. the vectors: ``d(A v)/dv = A`` (``A`` symmetric).

    The operator is a constant here (its parameters are not inputs): the backward pass of a
    product is one more product with the incoming gradient, so ``H @ v`` with
    ``v.requires_grad`` keeps ``v``'s graph (and differentiates twice, products all the way).
    """

    @staticmethod
    def forward(ctx, op, idxs, check_finite, *Vs):
        ctx.op, ctx.idxs = op, idxs
        with torch.no_grad():
            return tuple(op._block_products(list(zip(idxs, Vs)), check_finite))

    @staticmethod
    def backward(ctx, *grads):
        grads = [torch.zeros_like(g) if g is None else g for g in grads]
        outs = ctx.op._block_products(list(zip(ctx.idxs, grads)))
        return (None, None, None, *outs)


class EmpiricalRiskOperator(LinearOperator):
    """Base class: a curvature matrix of ``L(theta) = sum_b w_b loss_fn(model(X_b), y_b)``.

    Subclasses implement ``_build_state(X, y, batch_index)`` (whatever the products on
    one batch reuse, e.g. a gradient graph; ``X`` is a :class:`~curvature.batches.ModelInputs`)
    and ``_apply_state(state, V, idx)`` (the batch product ``[m, k]`` for ``V`` of shape
    ``[m, k]``, restricted to the diagonal block of the parameters ``idx``, all of them for
    ``idx=None``).

    Args:
        model: a ``torch.nn.Module``; called as ``model(*args, **kwargs)`` with the inputs
            ``adapter`` reads from a batch, its output turned into the loss's prediction by
            ``adapter`` (tensor, ``.logits``, ``["logits"]``, first tuple entry).
        loss_fn: ``loss_fn(z, y)`` returning a scalar (reduction "mean" or "sum").
        data: one batch (``(X, y)``, ``(X1, ..., y)``, a Mapping with ``"labels"``) or an
            iterable of batches (re-iterable: every product makes one pass).
        params: parameters to differentiate (see :func:`resolve_params`).
        mode: ``"eval"`` (default: running statistics, no dropout) or ``"train"``.
        reduction: only for loss functions without a ``reduction`` attribute and more
            than one batch: how batch losses combine (``"mean"`` or ``"sum"``).
        cache: keep the single-batch state between products (default ``True``).
        cache_check: how the cache notices changes of parameters, buffers and (for a single
            batch) the batch tensors: ``"checksum"`` (default: identity, ``_version`` and
            on-device fixed random projections, one sync per product; catches writes
            through ``.data``, also sum-preserving ones) or ``"version"`` (identity and
            ``_version`` only, no sync).
        check_data: verify each pass sees the same data (default ``True``; see
            :class:`BatchLoop` for what is detected).
        adapter: a :class:`~curvature.batches.BatchAdapter` for other batch / output formats.
        denominator: ``(inputs, y) -> float``, what the loss's mean divides a batch's sum
            by, for losses the package does not know (a subclass overriding ``forward``, a
            custom loss module); ``inputs`` is the batch's
            :class:`~curvature.batches.ModelInputs` (``.batch_size``, ``.args``, ``.kwargs``)
            and ``y`` its target.  Default: :func:`curvature.losses.mean_denominator`.
        micro_batch_size: split every batch into micro-batches of at most this many
            examples, re-weighted so the matrix is unchanged (``None``, default: whole
            batches).  Bounds the graph kept alive to that of ``micro_batch_size`` examples;
            a split batch is not cached.  See the module docstring.
        max_block_bytes: memory budget in bytes for the per-column working set of a block
            product (default ``2**30``, 1 GiB; ``None``: all columns at once); a block
            ``[n, k]`` is multiplied in chunks of ``max(1, max_block_bytes // c)`` columns,
            ``c`` = :meth:`_column_bytes`.  See the module docstring.

    Products inside ``torch.inference_mode()`` raise ``RuntimeError`` (autograd is off
    there); under ``torch.no_grad()`` they are computed as usual.  A vector with
    ``requires_grad`` gives a product differentiable w.r.t. that vector (the matrix is a
    constant: no gradient flows to the model's parameters).
    """

    _order_sensitive = False  # per-batch fingerprints (MC Fisher) instead of a global one
    _kernel_needs = "all"  # derivatives of the per-batch forward (curvature.kernels.derivative_kernels)
    _graph_checked = False  # the model's graph was searched for once-differentiable Functions

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
        adapter: BatchAdapter | None = None,
        denominator=None,
        process_group=None,
        micro_batch_size: int | None = None,
        max_block_bytes: int | None = 2**30,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        model, params, group = distributed.prepare(model, data, process_group, params)
        if mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}.")
        if cache_check not in ("checksum", "version"):
            raise ValueError(f"cache_check must be 'checksum' or 'version', got {cache_check!r}.")
        red = check_loss(loss_fn)
        if denominator is not None and not callable(denominator):
            raise TypeError(f"denominator must be a callable (X, y) -> float, got {type(denominator).__name__}.")
        if reduction is not None and reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
        if mode == "train" and _dropout_modules(model):
            raise ValueError(
                f"mode='train' with active dropout ({_dropout_modules(model)}) gives a random matrix; "
                "use mode='eval' (the default) or set dropout p=0."
            )
        self.micro_batch_size = _positive_int_or_none(micro_batch_size, "micro_batch_size")
        self.max_block_bytes = _positive_int_or_none(max_block_bytes, "max_block_bytes")
        if self.micro_batch_size is not None and mode == "train":
            norms = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            if norms:
                raise ValueError(
                    f"micro_batch_size with mode='train' changes the batch statistics of {norms[:3]}: the "
                    "micro-batched matrix would not be the batch's. Use mode='eval' or micro_batch_size=None."
                )
        inference = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_inference()]
        if inference:
            raise ValueError(
                f"The model's {inference[:3]}{' ...' if len(inference) > 3 else ''} are inference tensors "
                "(created under torch.inference_mode()), which autograd cannot differentiate or save for backward. "
                "Create or load the model outside inference mode, or replace them by clones made outside it: "
                "model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)."
            )
        self.model = model
        self.loss_fn = loss_fn
        self.mode = mode
        self.denominator = denominator
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
                               batch_sensitive=mode == "train", check=self.check_data, adapter=adapter,
                               denominator=denominator or (lambda X, y: mean_denominator(loss_fn, y, X.batch_size)),
                               process_group=group, signature=distributed.describe_operator(self))
        self.adapter = self._loop.adapter
        self._single = self._loop.single
        # The per-batch state is cached for one batch: a single batch, or an iterable yielding exactly
        # one batch when the data check is on (a changed batch then fails the pass before the product
        # is returned, so a stale cached state is never used silently).
        self._cacheable = self._single or (self._loop.local_num_batches == 1 and self.check_data)
        if self.micro_batch_size is not None:
            if self.reduction is None:
                raise ValueError(
                    "micro_batch_size needs to know how the loss combines examples: loss_fn has no "
                    "'reduction' attribute; pass reduction='mean' or 'sum'."
                )
            if self.reduction == "mean" and self._loop.denominator_error is not None:
                raise self._loop.denominator_error
            # one cached state per batch: a batch split into several micro-batches is rebuilt per product
            self._cacheable = self._cacheable and self._loop.max_batch_size <= self.micro_batch_size
        self.num_data = self._loop.num_data
        self.num_batches = self._loop.num_batches

    # ----------------------------------------------------------------- model
    def _forward(self, X: ModelInputs) -> tuple[list[Tensor], Tensor]:
        """Model prediction with fresh leaves for ``self.params`` (the model is not modified)."""
        leaves = [p.detach().requires_grad_(True) for p in self.params]
        chosen = set(self.param_names)
        tensors = {n: p.detach() for n, p in self.model.named_parameters() if n not in chosen}
        tensors.update(zip(self.param_names, leaves))
        z = self._predict(X, tensors)
        if not self._graph_checked and self._kernel_needs != "first":  # once per operator
            refuse_once_differentiable(z)
            self._graph_checked = True
        return leaves, z

    def _predict(self, X: ModelInputs, tensors: dict) -> Tensor:
        """``model`` on ``X`` with parameter tensors ``tensors`` (see :func:`forward`)."""
        z = forward(self.model, X, self.adapter, self.device, tensors)
        return z

    def _loss(self, z: Tensor, y: Tensor) -> Tensor:
        loss = self.loss_fn(z, y)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                "The loss must be a scalar (reduction 'mean' or 'sum'); loss_fn returned "
                f"{'shape ' + str(tuple(loss.shape)) if isinstance(loss, Tensor) else type(loss).__name__}."
            )
        return loss.reshape(())

    def _tracked(self) -> list[Tensor]:
        """Every parameter (and buffer in eval mode) of the model, by a plain walk of its modules.

        Cheaper than ``model.parameters()`` (no names, no memo of tensors); the order is fixed
        by the module tree, and a replaced module changes the list.
        """
        tensors, stack, seen = [], [self.model], set()
        while stack:
            m = stack.pop()
            if id(m) in seen:
                continue
            seen.add(id(m))
            tensors.extend(p for p in m._parameters.values() if p is not None)
            if self.mode == "eval":
                tensors.extend(b for b in m._buffers.values() if b is not None)
            stack.extend(c for c in m._modules.values() if c is not None)
        return tensors

    def _batch_tensors(self) -> list[Tensor]:
        """The tensors of a single batch (the cache depends on them), else nothing."""
        return tensor_leaves(self.data) if self._single else []

    def _key(self) -> tuple:
        """Identity, ``_version`` and ``data_ptr`` of every parameter, buffer (eval mode) and single-batch
        tensor: no sync.

        Catches optimizer steps and other in-place updates (``p.add_`` under ``no_grad``,
        ``y[0] = 2``), ``p.data = new`` and replaced modules.  It misses in-place writes
        *through* ``.data`` (``p.data.copy_(w)``, ``p.data.mul_(c)``), which do not bump
        ``p._version`` (checked in torch 2.13): :meth:`_checksum` covers those.
        """
        # inference tensors have no version counter (and cannot be written outside inference mode)
        return tuple((id(t), 0 if t.is_inference() else t._version, t.data_ptr())
                     for t in [*self._tracked(), *self._batch_tensors()])

    def _checksum(self) -> Tensor:
        """Fixed random projections (float64) of the tracked floating tensors and of a single batch.

        Stacked on the device (no sync).  A projection ``sum_i r_i t_i`` with fixed
        pseudo-random ``r`` changes under sum-preserving writes too (swapped rows, a
        permutation); cost: one elementwise product and one reduction per tensor.
        """
        with torch.no_grad():
            parts = [_projection(t) for t in self._tracked() if t.is_floating_point()]
            parts += [_projection(t) for t in self._batch_tensors()]
            parts = [p if p.device == self.device else p.to(self.device) for p in parts]
            return torch.stack(parts) if parts else torch.zeros(0, dtype=torch.float64, device=self.device)

    def _cache_valid(self, key: tuple, deferred: list | None = None) -> bool:
        """Whether the cached state is for ``key``'s tensors.

        With ``cache_check="checksum"`` the checksums are compared on the device: into
        ``deferred`` (a 0-dim "stale" flag, read by the caller with its other flags in one
        sync; the cache is then trusted provisionally) or, without it, with one sync here.
        """
        if self._state is None or key != self._state_key:
            return False
        if self.cache_check == "version":
            return True
        # Trade-off: one device read per product, to catch writes through .data that _version misses.
        sums = self._checksum()
        if sums.shape != self._state_sum.shape:
            return False
        if deferred is not None:
            deferred.append((sums != self._state_sum).any())
            return True
        return bool(torch.equal(sums, self._state_sum))

    def clear_cache(self) -> None:
        """Free the cached single-batch state (the next product rebuilds it)."""
        self._state = None
        self._state_key = None
        self._state_sum = None

    # -------------------------------------------------------------- products
    def _build_state(self, X: ModelInputs, y, batch_index: int):
        raise NotImplementedError

    def _apply_state(self, state, V: Tensor, idx: list[int] | None = None) -> Tensor:
        """Batch product restricted to the parameters ``idx`` (rows and columns); all if ``None``."""
        raise NotImplementedError

    def _get_state(self, X: ModelInputs, y, batch_index: int, deferred: list | None = None):
        """The per-batch state, from the cache for a single batch (``deferred``: see :meth:`_cache_valid`)."""
        if self._cacheable and self.cache:
            key = self._key()
            if not self._cache_valid(key, deferred):
                self.clear_cache()
                sums = self._checksum() if self.cache_check == "checksum" else None
                if self._single and self.check_data:  # a single batch changed in place: NaN / inf check
                    _check_finite(_read([X.batch_size], [_fingerprint(X, y, self.device)]))
                with torch.enable_grad(), model_state(self.model, self.mode), \
                        derivative_kernels(self.model, self._kernel_needs):
                    state = self._build_state(X, y, batch_index)
                self._state, self._state_key, self._state_sum = state, key, sums
            return self._state
        with torch.enable_grad(), model_state(self.model, self.mode), \
                derivative_kernels(self.model, self._kernel_needs):
            return self._build_state(X, y, batch_index)

    def _column_bytes(self, state, rows: int) -> int:
        """Estimated bytes one column of a block product with ``rows`` entries keeps alive.

        ``4 rows`` entries: the column's contiguous copy, the product column, and autograd's
        per-parameter pieces with their concatenation.  Subclasses add what scales with the
        columns in their state (the GGN: two output-sized tensors per column).
        """
        return 4 * rows * self.dtype.itemsize

    def _chunked(self, state, V: Tensor, idx, out: Tensor, w: float) -> None:
        """``out += w * (batch product of V)``, the columns in chunks under ``max_block_bytes``."""
        k = V.shape[1]
        chunk = k
        if self.max_block_bytes is not None:
            chunk = max(1, min(k, self.max_block_bytes // max(1, self._column_bytes(state, V.shape[0]))))
        if chunk >= k:
            out.add_(self._apply_state(state, V, idx), alpha=w)
            return
        for start in range(0, k, chunk):
            out[:, start:start + chunk].add_(self._apply_state(state, V[:, start:start + chunk], idx), alpha=w)

    def _units(self):
        """``(state key, inputs, target, weight)`` of every (micro-)batch of one pass."""
        for b, X, y, w in self._loop:
            for j, Xj, yj, wj in self._loop.micro_batches(X, y, w, self.micro_batch_size):
                yield (b if j is None else (b, j)), Xj, yj, wj

    def _block_products(self, blocks: Sequence[tuple[list[int] | None, Tensor]],
                        check_finite: bool = False) -> list[Tensor]:
        """Products of diagonal blocks ``[(param indices or None, V_b)]`` in one pass over the data.

        Memory bounds: every batch in micro-batches (``micro_batch_size``), every block in
        column chunks (``max_block_bytes``), see the module docstring.  Host reads: the
        cache's checksum comparison (``cache_check="checksum"``) and, with
        ``check_finite``, the refusal of NaN / inf results share one read at the end of the
        pass (a stale cache found then is rebuilt and the pass repeated).  A failure
        anywhere in the pass frees the cached state (no broken state survives an exception).
        """
        if torch.is_grad_enabled() and any(V.requires_grad for _, V in blocks):
            return list(_DifferentiableProducts.apply(self, [idx for idx, _ in blocks], check_finite,
                                                      *[V for _, V in blocks]))
        outs = [torch.zeros_like(V) for _, V in blocks]
        deferred: list[Tensor] = []  # 0-dim device flags: a stale cache (read once, below)
        # ranks with a stale cache, summed with the products: every rank then redoes the pass together
        stale = outs[0].new_zeros(1)
        try:
            with self._loop.shards.summed([*outs, stale]):  # data parallel: one all_reduce (and error flag)
                for b, X, y, w in self._units():
                    state = self._get_state(X, y, b, deferred)
                    with torch.enable_grad():
                        for out, (idx, V) in zip(outs, blocks):
                            self._chunked(state, V, idx, out, w)
                if deferred:
                    stale.add_(torch.stack(deferred).any().to(stale.dtype))
            stale_known = bool(deferred) or self._loop.shards.group is not None  # else nothing can be stale
            flags = [stale[0] > 0] if stale_known else []
            if check_finite:
                flags.append(~torch.stack([torch.isfinite(o).all() for o in outs]).all())
            read = torch.stack(flags).tolist() if flags else []  # the pass's one host read
        except BaseException:
            self.clear_cache()
            raise
        if stale_known and read[0]:  # written through .data since the state was built (on some rank): redo
            self.clear_cache()
            return self._block_products(blocks, check_finite)
        if check_finite and read[-1]:
            raise self._nonfinite_error()
        return outs

    _checks_own_finiteness = True  # _matmat below: NaN / inf refused in the pass's one host read

    def _matmat(self, V: Tensor) -> Tensor:
        return self._block_products([(None, V)], self.check_finite)[0]

    # ---------------------------------------------------------------- extras
    def loss_and_gradient(self) -> tuple[Tensor, Tensor]:
        """The loss over all data and its gradient w.r.t. ``params`` (flat ``[n]``). Costs one pass."""
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        grad = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        with self._loop.shards.summed([total, grad]):  # data parallel: summed over ranks
            for _, X, y, w in self._units():
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
