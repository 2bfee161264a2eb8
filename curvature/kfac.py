"""K-FAC / KFLR / KFRA: Kronecker-factored GGN blocks per layer, computed by BackPACK.

For a layer ``z = W x`` (Linear; Conv2d on unfolded patches) the GGN block of ``W`` is
``E_n[S_n S_n^T ⊗ x_n x_n^T]`` (``S_n S_n^T`` the GGN w.r.t. the layer output of example
``n``, row-major vec, see :mod:`curvature.kronecker`).  K-FAC replaces the mean of
products by the product of means::

    G ⊗ A,   G = E_n[S_n S_n^T]  [out, out],   A = E_n[x_n x_n^T]  [in, in]

(for ``reduction="sum"`` the loss is ``N`` times the mean and so is ``G``).  The kinds
differ in ``S_n``: ``"kflr"`` the exact square root of the loss Hessian (one column per
output), ``"kfac"`` ``mc_samples`` sampled labels (Martens & Grosse 2015: the Fisher),
``"kfra"`` BackPACK's recursive batch-averaged approximation (Botev et al. 2017).

Exact identities (tested): with ONE example, KFLR equals the exact GGN on each layer's
diagonal block (a single Linear layer: the whole GGN); for any batch, the bias block of a
Linear layer is exact and, for MSE, so is the last layer's block.  Otherwise K-FAC is an
approximation (tests/test_kronecker.py reports its error against the exact GGN).

Weight and bias: a Linear layer's weight and bias form ONE block over
``[W.reshape(-1), b]`` with the input augmented by a constant 1
(``A~ = E[[x; 1][x; 1]^T]``, so the W-b cross terms are kept); ``separate_bias=True``
gives separate blocks ``G ⊗ A`` and ``G``.  Conv2d layers always get separate blocks, as
BackPACK computes them: its conv factor ``G`` sums the output gradients over the ``T``
output positions before the outer product and ``A`` sums the patches' outer products
over positions (averaged over examples), so a joint block would scale the bias block by
``T``; BackPACK's conv K-FAC differs from the KFC paper (Grosse & Martens 2016) by ``T``,
so the input factor of a Conv2d weight block is divided by ``T`` here (KFC's scale: the
block's trace then matches the GGN block's in magnitude instead of exceeding it ``T``-fold).

Data: factors are accumulated separately over batches, ``G`` with the loss weights of
:class:`~curvature._empirical_risk.BatchLoop` (``B_b / N`` for a mean, 1 for a sum) and
``A`` (and the mean input) always with ``B_b / N``; so for ``"kflr"``/``"kfac"`` the result
over a DataLoader equals K-FAC on the concatenated data set (the Kronecker product is
taken at the end, not per batch).  ``"kfra"`` is a weighted average of per-batch KFRA
(its recursion is not additive over batches).

Models: ``nn.Sequential`` (nesting allowed) of BackPACK-supported modules; trainable
parameters only in ``Linear`` and ``Conv2d`` (groups=1) layers.  The user's model is never
modified (BackPACK runs on a deep copy), it is evaluated in eval mode by default, and the
caller's ``.grad`` is untouched and MC labels are seeded from ``(seed, batch)`` in a forked RNG
(the data loop leaves the global RNG as it found it, see :class:`~curvature._empirical_risk.BatchLoop`).
"""

from __future__ import annotations


import torch
from torch import Tensor, nn

from ._empirical_risk import BatchLoop, check_loss, resolve_params
from .losses import mean_denominator
from .backpack import _backpack_passes, _extended_copies
from .kronecker import KFACOperator, KroneckerOperator

__all__ = ["kfac"]

_KINDS = {"kflr": ("KFLR", "kflr"), "kfac": ("KFAC", "kfac"), "kfra": ("KFRA", "kfra")}
_LAYERS = (nn.Linear, nn.Conv2d)


def _check_structure(model: nn.Module, ext) -> None:
    """Sequential containers and BackPACK-supported leaves only (else BackPACK is silently wrong)."""
    supported = tuple(getattr(ext, "_BackpropExtension__module_extensions", {}).keys())
    for name, m in model.named_modules():
        label = f"{name or '<model>'} ({type(m).__name__})"
        if any(True for _ in m.children()):
            if not isinstance(m, nn.Sequential):
                raise ValueError(
                    f"kfac needs an nn.Sequential model (BackPACK follows the module order); module {label} "
                    "is a container with its own forward. Rewrite it as nn.Sequential of supported layers."
                )
        elif supported and type(m) not in supported:  # BackPACK looks up the exact class
            raise ValueError(
                f"kfac: module {label} is not supported by BackPACK's Kronecker-factored extensions "
                f"(supported: {sorted({t.__name__ for t in supported})})."
            )


def _plan(model: nn.Module, names: list[str], separate_bias: bool) -> list[tuple[str, list[str], str]]:
    """Blocks ``[(block name, [param names], "joint"|"weight"|"bias")]`` in parameter order."""
    plan = []
    i = 0
    while i < len(names):
        n = names[i]
        owner, _, attr = n.rpartition(".")
        m = model.get_submodule(owner)
        if not isinstance(m, _LAYERS) or attr not in ("weight", "bias"):
            raise ValueError(
                f"kfac supports trainable parameters of Linear and Conv2d layers only; parameter {n!r} "
                f"belongs to module {owner or '<model>'!r} ({type(m).__name__}). Freeze it "
                "(requires_grad_(False)) or leave it out with params=."
            )
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise ValueError(f"kfac: Conv2d module {owner!r} has groups={m.groups}; only groups=1 is supported.")
        nxt = names[i + 1] if i + 1 < len(names) else None
        if (attr == "weight" and isinstance(m, nn.Linear) and not separate_bias
                and nxt == (f"{owner}.bias" if owner else "bias")):
            plan.append((owner or "<model>", [n, nxt], "joint"))
            i += 2
        else:
            plan.append((n, [n], attr))
            i += 1
    return plan


def _check_bce_output(loss_fn, z: Tensor) -> None:
    if isinstance(loss_fn, nn.BCEWithLogitsLoss) and (z.dim() != 2 or z.shape[1] != 1):
        raise NotImplementedError(
            f"kfac (BackPACK) supports BCEWithLogitsLoss with one logit per example (output [N, 1]); "
            f"got output shape {tuple(z.shape)}.")


def kfac(
    model: nn.Module,
    loss_fn,
    data,
    params=None,
    *,
    kind: str = "kflr",
    mc_samples: int = 1,
    seed: int = 0,
    mode: str = "eval",
    separate_bias: bool = False,
    check_data: bool = True,
) -> KFACOperator:
    """Kronecker-factored GGN of ``loss_fn(model(X), y)`` over ``data``, one block per layer.

    Args:
        model: ``nn.Sequential`` of BackPACK-supported modules; parameters in Linear /
            Conv2d layers.
        loss_fn: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss``
            (reduction ``"mean"`` or ``"sum"``).
        data: a batch ``(X, y)`` or a re-iterable of batches.
        params: parameters (tensors or names); default all trainable, model order.
        kind: ``"kflr"`` (exact loss Hessian), ``"kfac"`` (Monte-Carlo, ``mc_samples``
            labels per example) or ``"kfra"``.
        mc_samples: sampled labels per example for ``kind="kfac"``.
        seed: seed of the sampled labels (per batch, from ``(seed, batch index)``).
        mode: ``"eval"`` (default) or ``"train"``.
        separate_bias: separate weight and bias blocks for Linear layers (default: one
            joint block with the input augmented by 1).
        check_data: verify every pass sees the same data.

    Returns:
        A :class:`~curvature.kronecker.KFACOperator` ``[n, n]`` over the flat ``params``
        (``param_shapes`` set), ``names`` the block names, ``param_names`` the
        parameters of each block.  ``K.solve``/``K.inverse()``/``K.damped(lam)`` are exact
        through the factors.

    Cost: one forward and one extended backward pass per batch (KFLR: about ``C``
    backward passes' worth of work for ``C`` outputs; KFAC: ``mc_samples``).

    Raises:
        ValueError: unknown ``kind``, a parameter outside Linear/Conv2d layers (the
            message names the module), a non-Sequential model or an unsupported module.
        NotImplementedError: an unsupported loss, or BackPACK refusing the model.
    """
    try:
        from backpack import extensions
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError("curvature.kfac needs backpack-for-pytorch (pip install backpack-for-pytorch).") from exc
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {kind!r}.")
    if int(mc_samples) < 1:
        raise ValueError(f"mc_samples must be >= 1, got {mc_samples}.")
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}.")
    reduction = check_loss(loss_fn)
    if not isinstance(loss_fn, (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)):
        raise NotImplementedError(
            f"kfac supports MSELoss, CrossEntropyLoss and BCEWithLogitsLoss, got {type(loss_fn).__name__}."
        )
    if isinstance(loss_fn, nn.CrossEntropyLoss) and (loss_fn.weight is not None or loss_fn.ignore_index != -100):
        raise NotImplementedError("kfac (BackPACK) supports CrossEntropyLoss without class weights and ignore_index.")
    if isinstance(loss_fn, nn.BCEWithLogitsLoss) and (loss_fn.weight is not None or loss_fn.pos_weight is not None):
        raise NotImplementedError("kfac (BackPACK) supports BCEWithLogitsLoss without weight= and pos_weight=.")
    ext_name, attribute = _KINDS[kind]
    ext = getattr(extensions, ext_name)
    ext = ext(mc_samples=int(mc_samples)) if kind == "kfac" else ext()
    _check_structure(model, ext)
    names, chosen = resolve_params(model, params)
    plan = _plan(model, names, separate_bias)
    device = chosen[0].device
    loop = BatchLoop(data, device, reduction, order_sensitive=kind == "kfac", check=check_data,
                     batch_sensitive=mode == "train",
                     denominator=lambda X, y: mean_denominator(loss_fn, y, X.batch_size))

    work, lf, named = _extended_copies(model, loss_fn, names)
    joint_layers = {blk for blk, _, how in plan if how == "joint"}
    mean_inputs: dict[str, Tensor] = {}
    hooks = [work.get_submodule(layer).register_forward_hook(
        lambda m, inp, out, layer=layer: mean_inputs.__setitem__(layer, inp[0].detach().mean(0)))
        for layer in joint_layers]

    # Conv2d weight blocks: BackPACK's factors are T times the KFC ones (T = output positions)
    conv_positions: dict[str, int] = {}
    conv_layers = {p[0].rsplit(".", 1)[0] for _, p, how in plan if how == "weight"}
    conv_layers = {c for c in conv_layers if isinstance(work.get_submodule(c), nn.Conv2d)}
    hooks += [work.get_submodule(layer).register_forward_hook(
        lambda m, inp, out, layer=layer: conv_positions.__setitem__(layer, out.shape[-2] * out.shape[-1]))
        for layer in conv_layers]

    acc: dict[str, list[Tensor]] = {}
    xbar: dict[str, Tensor] = {}
    try:
        passes = _backpack_passes(
            loop, work, lf, ext, named, names, attribute, seed=seed, mode=mode, device=device,
            check_output=lambda z: _check_bce_output(loss_fn, z),
            describe_error=lambda exc: f"BackPACK cannot compute {ext_name} for this model: {exc}",
        )
        for _, X, w, values in passes:
            w_in = X.batch_size / loop.num_data  # input statistics are averages over examples
            for n, value in zip(names, values):
                facs = [f.detach() for f in value]
                weights = [w] + [w_in] * (len(facs) - 1)  # G: loss weight; A: example average
                if n not in acc:
                    acc[n] = [torch.zeros_like(f) for f in facs]
                for a, f, wt in zip(acc[n], facs, weights):
                    a.add_(f, alpha=wt)
            for layer in joint_layers:
                xb = mean_inputs.pop(layer).reshape(-1)
                xbar[layer] = xbar[layer].add(xb, alpha=w_in) if layer in xbar else w_in * xb
    finally:
        for h in hooks:
            h.remove()

    for facs in acc.values():  # exactly symmetric (rounding in the einsums may leave ~eps asymmetry)
        for f in facs:
            f.copy_(0.5 * (f + f.T))
    shapes = dict(zip(names, (p.shape for p in chosen)))
    blocks = []
    for blk, pnames, how in plan:
        if how == "joint":
            G, A = acc[pnames[0]]
            xb = xbar[blk]
            one = torch.ones(1, 1, dtype=A.dtype, device=A.device)
            At = torch.cat([torch.cat([A, xb[:, None]], 1), torch.cat([xb[None, :], one], 1)], 0)
            blocks.append(KroneckerOperator(G, At, with_bias=True, param_shapes=[shapes[n] for n in pnames]))
        elif how == "weight":
            G, A = acc[pnames[0]]
            layer = pnames[0].rsplit(".", 1)[0]
            if layer in conv_positions:
                A = A / conv_positions[layer]
            blocks.append(KroneckerOperator(G, A, param_shapes=[shapes[pnames[0]]]))
        else:
            (G,) = acc[pnames[0]]
            one = torch.ones(1, 1, dtype=G.dtype, device=G.device)
            blocks.append(KroneckerOperator(G, one, param_shapes=[shapes[pnames[0]]]))
    return KFACOperator(blocks, names=[blk for blk, _, _ in plan], param_names=[p for _, p, _ in plan])
