"""K-FAC / KFLR / empirical K-FAC on Linear and Conv2d layers anywhere in a model (and KFRA).

For a layer ``s = W x`` (Linear; Conv2d on unfolded patches) the GGN block of ``W`` is
``sum_n sum_k vec(grad_W,nk) vec(grad_W,nk)^T`` with ``grad_W,nk = sum_t g_nkt x_nt^T``
(``g`` the output gradient of column ``k`` of the loss-Hessian factor ``S_n``, ``t`` the
positions that share ``W``; row-major vec, see :mod:`curvature.kronecker`).  K-FAC
replaces the mean of products by the product of means::

    G ⊗ A,   G [out, out] from the output gradients,   A [in, in] from the inputs.

The kinds differ in ``S_n`` (the factor of the loss's output curvature, from
:mod:`curvature.losses`): ``"kflr"`` (alias ``"exact"``) the exact square root of the loss
Hessian (one backward per output), ``"kfac"`` (alias ``"mc"``) ``mc_samples`` gradients
at labels sampled from the model (Martens & Grosse 2015: the Fisher), ``"empirical"`` the
gradient at the data labels (the empirical Fisher; any loss), ``"kfra"`` BackPACK's
recursive batch-averaged approximation (Botev et al. 2017; ``nn.Sequential`` only).

Weight sharing (Eschenhagen et al. 2023), for Linear layers on ``[B, ..., d_in]`` inputs
(``T`` = positions per example) and Conv2d layers (``T`` = output positions), selected by
``approx``:

* ``"expand"`` (default; the KFC paper's choice for convolutions): every position is an
  example, ``G = sum_{n,t,k} g g^T`` and ``A = E_n[(1/T) sum_t x x^T]``.  Exact e.g. for
  a deep linear network applied position-wise under MSE on every position (a loss term
  per position), any number of examples.
* ``"reduce"``: positions are summed first, ``G = sum_{n,k} (sum_t g)(sum_t g)^T`` and
  ``A = E_n[xbar xbar^T]`` with ``xbar = (1/T) sum_t x``.  Exact e.g. for a linear layer
  whose outputs are averaged over positions before a deep linear head under MSE (one
  loss term per sequence).

With ``T = 1`` both are plain K-FAC.  ``(G, A)`` scaling: ``G`` carries the loss's
reduction (``reduction="sum"`` gives ``N`` times the mean's ``G``), ``A`` is an average.

Exact identities (tested): with ONE example and ``T = 1``, KFLR equals the exact GGN on
each layer's diagonal block; for any batch, the bias block of a Linear layer is exact;
for deep linear networks under MSE, every block is exact (expand on per-position losses,
reduce on pooled outputs).  Otherwise K-FAC approximates (tests report its error).

Weight and bias: a layer's weight and bias form ONE block over ``[W.reshape(-1), b]`` with
every input row augmented by a constant 1 (``A~ = E[[x; 1][x; 1]^T]``: the W-b cross terms
are kept; KFC's homogeneous coordinates for Conv2d); ``separate_bias=True`` gives
separate blocks ``G ⊗ A`` and ``G`` (``G`` then is the joint block's bias-bias part).

Tied weights: a parameter held by several Linear/Conv2d modules, or a module called
several times, gets ONE block, its calls treated as further weight-sharing positions
(``T`` = all positions of all calls), which keeps the exact cases exact.  A parameter
also used outside such modules (a weight tied to an ``nn.Embedding``, ``F.linear`` on a
module's weight) is refused: on the first batch the gradient rebuilt from the recorded
rows is compared with autograd's.  Parameters not in ``params`` are skipped (their
modules get no hooks); any other module may sit anywhere (LayerNorm, attention,
residual connections, custom modules) as long as its parameters are not in ``params``.

Data: factors are accumulated over batches, ``G`` with the loss weights of
:class:`~curvature._empirical_risk.BatchLoop` and ``A`` with ``B_b / N``, so over a
DataLoader the result equals K-FAC on the concatenated data set.  The model is used
in place (forward hooks, removed afterwards), in eval mode by default (``mode="train"``
refuses active dropout and BatchNorm); ``.grad`` and the global RNG are untouched (MC
labels come from a generator seeded from ``(seed, batch index)``, the same labels as
``FisherOperator(kind="mc", seed=seed)``).

Cost per batch: one forward and ``K`` backwards to the layer outputs only (``K`` = outputs
for KFLR, ``mc_samples`` for MC, 1 for empirical), then ``O(rows (d_in^2 + K d_out^2))``
for the factors.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import distributed
from ._empirical_risk import BatchLoop, check_loss, resolve_params
from ._kfac_capture import APPROX, KINDS, LayerBlock, capture_rows, plan_blocks
from .backpack import _backpack_passes, _extended_copies, _extension, batch_seed, check_finite_params, resolve_seed
from .kronecker import KFACOperator, KroneckerOperator
from .losses import mean_denominator

__all__ = ["kfac"]

_ALIASES = {"exact": "kflr", "mc": "kfac"}


def _symmetrized(F: Tensor) -> Tensor:
    """``(F^T + F) / 2``, exactly symmetric (matmul rounding may leave ~eps asymmetry); one new tensor.

    The transpose is copied first (a cache-blocked copy in torch) and ``F`` added in place:
    about 2.5x faster on the CPU than adding the strided view ``F.T`` for a ``784 x 784`` factor.
    """
    return F.T.clone(memory_format=torch.contiguous_format).add_(F).mul_(0.5)  # always a copy (never aliases F)


def check_kfac_args(model, loss_fn, data, params, *, kind: str, mc_samples: int, seed, mode: str, approx: str,
                    separate_bias: bool, check_data: bool, caller: str = "kfac", process_group=None):
    """Validate :func:`kfac`'s arguments; returns ``(model, kind, seed, loop, names, tensors, blocks)``.

    ``model`` is the module to run (a ``DistributedDataParallel`` model unwrapped).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    model, params, group = distributed.prepare(model, data, process_group, params)
    kind = _ALIASES.get(kind, kind)
    if kind not in KINDS + ("kfra",):
        raise ValueError(f"kind must be one of {sorted(KINDS + ('kfra',) + tuple(_ALIASES))}, got {kind!r}.")
    if approx not in APPROX:
        raise ValueError(f"approx must be one of {APPROX}, got {approx!r}.")
    if isinstance(mc_samples, bool) or int(mc_samples) != mc_samples or int(mc_samples) < 1:
        raise ValueError(f"mc_samples must be an integer >= 1, got {mc_samples}.")
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}.")
    seed = resolve_seed(seed)
    reduction = check_loss(loss_fn)
    if reduction is None:
        raise ValueError(f"{caller} needs the loss's reduction to scale the factors: loss_fn has no 'reduction' "
                         "attribute; use a torch loss module with reduction='mean' or 'sum'.")
    names, tensors = resolve_params(model, params)
    check_finite_params(names, tensors, caller)
    blocks = plan_blocks(model, names, tensors, separate_bias)
    signature = distributed.describe(caller, loss_fn, names, [p.shape for p in tensors], kind=kind, approx=approx,
                                     mode=mode, mc_samples=int(mc_samples), seed=seed, separate_bias=separate_bias)
    loop = BatchLoop(data, tensors[0].device, reduction, order_sensitive=kind == "kfac", check=check_data,
                     denominator=lambda X, y: mean_denominator(loss_fn, y, X.batch_size),
                     process_group=group, signature=signature)
    return model, kind, seed, loop, names, tensors, blocks


def factor_sizes(blk: LayerBlock, params_by_name: dict) -> tuple[int, int | None]:
    """``(d_out, d_in)`` of a block's factors ``G [d_out, d_out]`` and ``A [d_in, d_in]`` (``None``: bias block).

    ``d_in`` counts the inputs of one output (``in_features``, or ``C_in kh kw`` for a
    convolution), plus one for a joint weight-and-bias block.
    """
    first = params_by_name[blk.param_names[0]]
    if blk.how == "bias":
        return first.shape[0], None
    return first.shape[0], first[0].numel() + (blk.how == "joint")


def accumulate_factors(model, loss_fn, loop: BatchLoop, blocks: list[LayerBlock], params_by_name: dict, *,
                       kind: str, mc_samples: int, seed: int, mode: str, approx: str):
    """``[(G, A or None)]`` per block over all of ``loop`` (see the module doc for the scaling).

    Data parallel (``loop`` over a process group): the per-rank sums are added over the
    ranks in one ``all_reduce`` (zeros from a rank with an empty shard).
    """
    Gs: list[Tensor] = []
    As: list[Tensor | None] = []
    for blk in blocks:
        p = params_by_name[blk.param_names[0]]
        d_out, d_in = factor_sizes(blk, params_by_name)
        Gs.append(p.new_zeros(d_out, d_out))
        As.append(None if d_in is None else p.new_zeros(d_in, d_in))
    with loop.shards.summed(Gs + [A for A in As if A is not None]):
        for rows in capture_rows(model, loss_fn, loop, blocks, params_by_name, kind=kind, mc_samples=mc_samples,
                                 seed_of_batch=lambda b: batch_seed(seed, b), mode=mode):
            for i, (x, gs) in enumerate(zip(rows.inputs, rows.grads)):
                for g in gs:
                    g2 = g.reshape(-1, g.shape[-1]) if approx == "expand" else g.sum(1)
                    _add_gram(Gs[i], g2, rows.weight)
                if x is None:
                    continue
                if approx == "expand":
                    x2 = x.reshape(-1, x.shape[-1])
                else:
                    x2 = x.mean(1)
                As[i].add_((x2.T @ x2).mul_(rows.share / x2.shape[0]))
    return [(_symmetrized(G), None if A is None else _symmetrized(A)) for G, A in zip(Gs, As)]


def _add_gram(acc: Tensor | None, X: Tensor, alpha: float) -> Tensor:
    """``acc + alpha X^T X`` for ``X`` ``[rows, d]`` (a new ``[d, d]`` tensor when ``acc`` is ``None``, else
    ``acc`` updated in place); the scaling is fused into the matrix product (no extra pass)."""
    if acc is not None:
        return acc.addmm_(X.T, X, alpha=alpha)
    if alpha == 1.0:
        return X.T @ X
    return torch.addmm(X.new_empty(X.shape[1], X.shape[1]), X.T, X, beta=0.0, alpha=alpha)  # beta=0: input unread


def _assemble(blocks: list[LayerBlock], factors, shapes: dict) -> KFACOperator:
    ops = []
    for blk, (G, A) in zip(blocks, factors):
        pshapes = [shapes[n] for n in blk.param_names]
        if blk.how == "bias":
            A = torch.ones(1, 1, dtype=G.dtype, device=G.device)
        # factors symmetrized exactly (_symmetrized), or the 1 x 1 ones of a bias block
        ops.append(KroneckerOperator(G, A, with_bias=blk.how == "joint", param_shapes=pshapes, symmetric=True))
    return KFACOperator(ops, names=[b.name for b in blocks], param_names=[b.param_names for b in blocks])


def kfac(
    model: nn.Module,
    loss_fn,
    data,
    params=None,
    *,
    kind: str = "kflr",
    approx: str = "expand",
    mc_samples: int = 1,
    seed: int | None = 0,
    mode: str = "eval",
    separate_bias: bool = False,
    check_data: bool = True,
    process_group=None,
) -> KFACOperator:
    """Kronecker-factored GGN / Fisher of ``loss_fn(model(X), y)`` over ``data``, one block per layer.

    Args:
        model: any ``nn.Module``; the parameters in ``params`` must be weights/biases of
            ``nn.Linear`` / ``nn.Conv2d`` (groups 1) modules, which may sit anywhere.
        loss_fn: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss``
            (reduction ``"mean"`` or ``"sum"``; outputs ``[B, C, ...]`` for CE and
            ``[B, ..., C]`` for MSE/BCE); ``kind="empirical"`` takes any loss module that
            decomposes over examples.
        data: a batch ``(X, y)`` or a re-iterable of batches.
        params: parameters (tensors or names); default all trainable, model order.
        kind: ``"kflr"``/``"exact"`` (exact loss-Hessian square root), ``"kfac"``/``"mc"``
            (``mc_samples`` sampled labels per output), ``"empirical"`` (data labels) or
            ``"kfra"`` (BackPACK, ``nn.Sequential`` of supported layers, no weight sharing).
        approx: ``"expand"`` or ``"reduce"`` for weight sharing (sequence inputs to
            Linear, Conv2d positions, tied weights); see the module doc.
        mc_samples: sampled labels per output for ``kind="kfac"``.
        seed: seed of the sampled labels (per batch, from ``(seed, batch index)``);
            ``None`` means 0.
        mode: ``"eval"`` (default) or ``"train"``.
        separate_bias: separate weight and bias blocks (default: one joint block with
            the input augmented by 1).
        check_data: verify every pass sees the same data.
        process_group: data parallel (see :mod:`curvature.distributed`): every rank of
            the group passes its shard and gets the factors of the whole data set (one
            ``all_reduce`` of all factors; empty shards allowed; a
            ``DistributedDataParallel`` model is unwrapped).  Sampled labels of global
            batch ``b`` are seeded from ``(seed, b)``: shards of consecutive batches in rank
            order give the single-process factors.

    Returns:
        A :class:`~curvature.kronecker.KFACOperator` ``[n, n]`` over the flat ``params``
        (``param_shapes`` set), ``names`` the block names (module name for a joint
        block, else the parameter name), ``param_names`` the parameters of each block.
        ``K.solve``/``K.inverse()``/``K.damped(lam)`` are exact through the factors.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import curvature
        >>> class Net(nn.Module):  # not a Sequential: hooks find the Linear layers
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)
        ...     def forward(self, x):
        ...         return self.fc2(torch.tanh(self.fc1(x)) + 1.0)
        >>> X, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> K = curvature.kfac(Net(), nn.CrossEntropyLoss(), (X, y))
        >>> K.names, K.shape
        (['fc1', 'fc2'], (67, 67))
        >>> step = K.damped(1e-3).solve(torch.ones(67))  # exact damped inverse

    Raises:
        ValueError: unknown ``kind``/``approx``, a parameter outside Linear/Conv2d
            layers or used outside them (the message names it), NaN/inf parameters.
        NotImplementedError: a loss without the needed output curvature (the message
            names the kinds that work).
    """
    model, kind, seed, loop, names, tensors, blocks = check_kfac_args(
        model, loss_fn, data, params, kind=kind, mc_samples=mc_samples, seed=seed, mode=mode, approx=approx,
        separate_bias=separate_bias, check_data=check_data, process_group=process_group)
    shapes = {n: p.shape for n, p in zip(names, tensors)}
    if kind == "kfra":
        if approx != "expand":
            raise ValueError("kind='kfra' (BackPACK) has no weight-sharing variants; leave approx='expand'.")
        return _assemble(*_kfra_blocks(model, loss_fn, loop, blocks, names, mode), shapes)
    factors = accumulate_factors(model, loss_fn, loop, blocks, dict(zip(names, tensors)), kind=kind,
                                 mc_samples=int(mc_samples), seed=seed, mode=mode, approx=approx)
    return _assemble(blocks, factors, shapes)


# ------------------------------------------------------------------------- KFRA (BackPACK)
def _check_structure(model: nn.Module, ext) -> None:
    """Sequential containers and BackPACK-supported leaves only (else BackPACK is silently wrong)."""
    supported = tuple(getattr(ext, "_BackpropExtension__module_extensions", {}).keys())
    for name, m in model.named_modules():
        label = f"{name or '<model>'} ({type(m).__name__})"
        if any(True for _ in m.children()):
            if not isinstance(m, nn.Sequential):
                raise ValueError(
                    f"kfac(kind='kfra') needs an nn.Sequential model (BackPACK follows the module order); module "
                    f"{label} is a container with its own forward. Use kind='kflr' (any model).")
        elif supported and type(m) not in supported:  # BackPACK looks up the exact class
            raise ValueError(
                f"kfac(kind='kfra'): module {label} is not supported by BackPACK's KFRA "
                f"(supported: {sorted({t.__name__ for t in supported})}). Use kind='kflr' (any model).")


def _kfra_blocks(model, loss_fn, loop: BatchLoop, blocks: list[LayerBlock], names: list[str], mode: str):
    """KFRA factors from BackPACK: ``(blocks, [(G, A)])`` (joint Conv2d blocks are split: BackPACK's are separate).

    BackPACK's conv factor ``G`` sums the output gradients over the ``T`` positions before the
    outer product and its ``A`` sums the patch outer products over positions; ``A`` is
    divided by ``T`` here (KFC's scale).  ``A`` of a joint Linear block is augmented by the
    mean input and 1.  KFRA's recursion is not additive over batches: the result over a
    DataLoader is a weighted average of per-batch KFRA.
    """
    if not isinstance(loss_fn, (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)):
        raise NotImplementedError(f"kfac(kind='kfra') supports MSELoss, CrossEntropyLoss and BCEWithLogitsLoss, "
                                  f"got {type(loss_fn).__name__}.")
    ext = _extension("KFRA")
    _check_structure(model, ext)
    split = []
    for blk in blocks:
        conv = isinstance(model.get_submodule(blk.modules[0]), nn.Conv2d)
        if len(blk.modules) != 1:
            raise ValueError(f"kfac(kind='kfra'): parameters {blk.param_names} are shared by modules {blk.modules}; "
                             "BackPACK cannot handle tied weights. Use kind='kflr'.")
        if blk.how == "joint" and conv:
            split += [LayerBlock(n, [n], how, blk.modules) for n, how in zip(blk.param_names, ("weight", "bias"))]
        else:
            split.append(blk)
    work, lf, named = _extended_copies(model, loss_fn, names)
    mean_inputs: dict[str, Tensor] = {}
    positions: dict[str, int] = {}  # output positions T of the last call of each conv layer

    def record(m, inp, out, layer):
        mean_inputs[layer] = inp[0].detach().mean(0)
        if isinstance(m, nn.Conv2d):
            positions[layer] = out.shape[-2] * out.shape[-1]

    hooks = [work.get_submodule(blk.modules[0]).register_forward_hook(
        lambda m, i, o, layer=blk.modules[0]: record(m, i, o, layer)) for blk in split]
    # accumulators allocated up front (zeros on a rank with an empty shard): summed over ranks at the end
    acc: dict[str, list[Tensor]] = {}
    for n in names:
        p = named[n]
        facs = [p.new_zeros(p.shape[0], p.shape[0])]
        if p.dim() > 1:  # a weight: G and A (BackPACK's A: the inputs of one output, C_in kh kw for a conv)
            facs.append(p.new_zeros(p[0].numel(), p[0].numel()))
        acc[n] = facs
    xbar: dict[str, Tensor] = {}
    # per conv layer: [sum over batches of T, batches], summed over ranks (a rank with no data saw no T)
    seen_positions: dict[str, Tensor] = {}
    for blk in split:
        w0 = named[blk.param_names[0]]
        if blk.how == "joint":
            xbar[blk.modules[0]] = w0.new_zeros(w0[0].numel())
        if isinstance(model.get_submodule(blk.modules[0]), nn.Conv2d):
            seen_positions[blk.modules[0]] = w0.new_zeros(2)
    try:
        with loop.shards.summed([a for facs in acc.values() for a in facs] + list(xbar.values())
                                + list(seen_positions.values())):
            passes = _backpack_passes(
                loop, work, lf, ext, named, names, "kfra", seed=None, mode=mode, device=loop.device,
                check_output=lambda z, y: _check_bce_output(loss_fn, z),
                describe_error=lambda exc: f"BackPACK cannot compute KFRA for this model: {exc}")
            for _, X, w, values in passes:
                w_in = X.batch_size / loop.num_data
                for n, value in zip(names, values):
                    weights = [w] + [w_in] * (len(value) - 1)
                    for a, f, wt in zip(acc[n], value, weights):
                        a.add_(f.detach(), alpha=wt)
                for layer, xb in xbar.items():
                    xb.add_(mean_inputs[layer].reshape(-1), alpha=w_in)
                for layer, seen in seen_positions.items():
                    seen[0] += positions[layer]
                    seen[1] += 1
    finally:
        for h in hooks:
            h.remove()
    factors = []
    for blk in split:
        facs = [_symmetrized(f) for f in acc[blk.param_names[0]]]
        layer = blk.modules[0]
        if blk.how == "joint":
            G, A = facs
            xb = xbar[layer]
            one = torch.ones(1, 1, dtype=A.dtype, device=A.device)
            A = torch.cat([torch.cat([A, xb[:, None]], 1), torch.cat([xb[None, :], one], 1)], 0)
        elif blk.how == "weight":
            G, A = facs
            A = A / (seen_positions[layer][0] / seen_positions[layer][1]) if layer in seen_positions else A
        else:
            G, A = facs[0], None
        factors.append((G, A))
    return split, factors


def _check_bce_output(loss_fn, z: Tensor) -> None:
    if isinstance(loss_fn, nn.BCEWithLogitsLoss) and (z.dim() != 2 or z.shape[1] != 1):
        raise NotImplementedError(
            f"kfac(kind='kfra') (BackPACK) supports BCEWithLogitsLoss with one logit per example (output [N, 1]); "
            f"got output shape {tuple(z.shape)}.")
