"""Layer inputs and output gradients of Linear / Conv2d layers anywhere in a model, per batch.

The one pass that K-FAC (:func:`curvature.kfac`) and EKFAC (:func:`curvature.ekfac`)
share.  Forward hooks on the layers that own parameters of interest record every call's
input ``x`` and output ``s``; then each column of an output factor ``S`` (``[K, *z.shape]``,
``Lambda_n = sum_k S_k S_k^T`` per example, see :mod:`curvature.losses`) is
back-propagated with ``torch.autograd.grad`` to the recorded outputs only (no parameter
gradients are formed, ``.grad`` is untouched).  Rows:

* ``Linear`` on ``x`` ``[B, ..., d_in]``: ``T = prod(...)`` positions per example
  (``T = 1`` for ``[B, d_in]``); output gradients ``[B, T, d_out]``.
* ``Conv2d`` (groups 1, zero padding): the unfolded patches ``[B, T, c_in kh kw]``
  (``T`` output positions, the order of ``weight.reshape(out, -1)``); gradients
  ``[B, T, c_out]``.

A parameter used by several modules (tied weights) or a module called several times gets
ONE block; its calls are concatenated along the position axis (``T`` = all positions of
all calls), i.e. the calls are treated as weight-sharing positions (Eschenhagen et al.
2023), which is exact in their exact cases (e.g. one Linear applied to two inputs of a
deep linear network under MSE, expand).  A joint weight+bias block appends a constant 1 to
every input row.

Coverage check: on the first batch the first column is also back-propagated to the
parameters, and the gradient rebuilt from the recorded rows (``sum_rows g x^T``, compared
through a fixed random projection: no extra matrix product) must equal autograd's; a
parameter used outside the hooked modules (``F.linear(x, self.weight)`` in a custom
``forward``, a weight tied to an Embedding, ...) raises ``ValueError`` instead of giving
silently incomplete factors.  Its cost is one parameter gradient (what a plain
``loss.backward()`` computes) per call.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ._empirical_risk import BatchLoop, _dropout_modules, _weights, forward, model_state
from .losses import (
    fisher_refusal,
    has_closed_form,
    output_gradient_factors,
    output_hessian_sqrt,
    sample_output_gradients,
)

__all__ = ["LayerBlock", "BatchRows", "plan_blocks", "capture_rows", "output_factor", "KINDS", "APPROX"]

KINDS = ("kflr", "kfac", "empirical")
APPROX = ("expand", "reduce")
_LAYERS = (nn.Linear, nn.Conv2d)
_COVERAGE_STREAM = 101  # the fixed projection of the coverage check (a stream of _empirical_risk._weights)


@dataclass
class LayerBlock:
    """One Kronecker block: its name, parameters (model names), ``how`` and the modules feeding it.

    ``how``: ``"joint"`` (weight and bias, input augmented by 1), ``"weight"`` or ``"bias"``.
    """

    name: str
    param_names: list[str]
    how: str
    modules: list[str] = field(default_factory=list)


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """``{id(parameter): [(module name, module, attribute)]}`` over every module that holds it."""
    owners: dict[int, list] = {}
    for mname, m in model.named_modules():
        for attr, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((mname, m, attr))
    return owners


def _check_layer(mname: str, m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        if m.groups != 1:
            raise ValueError(f"kfac: Conv2d module {mname!r} has groups={m.groups}; only groups=1 is supported.")
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise ValueError(
                f"kfac: Conv2d module {mname!r} has padding={m.padding!r}, padding_mode={m.padding_mode!r}; "
                "only explicit integer zero padding is supported (write padding as numbers).")


def plan_blocks(model: nn.Module, names: list[str], tensors: list[Tensor], separate_bias: bool) -> list[LayerBlock]:
    """Blocks in parameter order; a weight followed by the bias of the same module(s) is one joint block.

    Raises:
        ValueError: a parameter held by a module other than Linear/Conv2d (named with the
            module and its type), grouped or non-zero-padded convolutions.
    """
    owners = _owners(model)
    users = []
    for n, p in zip(names, tensors):
        found = owners.get(id(p), [])
        for mname, m, attr in found:
            if not isinstance(m, _LAYERS) or attr not in ("weight", "bias"):
                raise ValueError(
                    f"kfac supports trainable parameters of Linear and Conv2d layers only; parameter {n!r} "
                    f"belongs to module {mname or '<model>'!r} ({type(m).__name__}). Freeze it "
                    "(requires_grad_(False)) or leave it out with params=.")
            _check_layer(mname, m)
        attrs = {attr for _, _, attr in found}
        if len(attrs) != 1:
            raise ValueError(f"kfac: parameter {n!r} is used as {sorted(attrs) or 'nothing'} by its modules; "
                             "it must be the weight (or the bias) of Linear/Conv2d modules.")
        users.append((attrs.pop(), [mname for mname, _, _ in found]))
    blocks, i = [], 0
    while i < len(names):
        attr, mods = users[i]
        if (attr == "weight" and not separate_bias and i + 1 < len(names)
                and users[i + 1] == ("bias", mods)):
            blocks.append(LayerBlock(mods[0] or "<model>", [names[i], names[i + 1]], "joint", mods))
            i += 2
        else:
            blocks.append(LayerBlock(names[i], [names[i]], attr, mods))
            i += 1
    return blocks


def input_rows(m: nn.Module, x: Tensor) -> Tensor:
    """Layer inputs as rows ``[B, T, d_in]`` (Conv2d: unfolded patches)."""
    if isinstance(m, nn.Conv2d):
        if x.dim() != 4:
            raise ValueError(f"kfac: Conv2d input must be [B, C, H, W], got {tuple(x.shape)}.")
        cols = torch.nn.functional.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
        return cols.transpose(1, 2)
    if x.dim() < 2:
        raise ValueError(f"kfac: Linear input must be batched [B, ..., d_in], got {tuple(x.shape)}.")
    return x.reshape(x.shape[0], -1, x.shape[-1])


def grad_rows(m: nn.Module, g: Tensor) -> Tensor:
    """Gradients w.r.t. a layer output as rows ``[B, T, d_out]``."""
    if isinstance(m, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def output_factor(kind: str, loss_fn, z: Tensor, y: Tensor, reduction: str, mc_samples: int,
                  generator: torch.Generator) -> Tensor:
    """``S`` ``[K, *z.shape]`` with the batch loss's output curvature ``sum_k S_k S_k^T`` per example.

    ``"kflr"``: the exact square root of the loss Hessian (``K = C`` columns); ``"kfac"``:
    ``mc_samples`` gradients at labels sampled from ``generator``; ``"empirical"``: the
    gradient at the data labels (``K = 1``).  Each carries the reduction factor of the batch loss.
    """
    if kind == "empirical":
        return output_gradient_factors(loss_fn, z, y, reduction)
    if kind == "kfac":
        why = fisher_refusal(loss_fn, y)
        if why is not None:
            raise NotImplementedError(
                f"kfac(kind='kfac') samples labels from the model's predictive distribution: {why}. "
                "Use kind='empirical' (any loss that decomposes over examples).")
        return sample_output_gradients(loss_fn, z, reduction, mc_samples, generator, y)
    if not has_closed_form(loss_fn):
        raise NotImplementedError(
            f"kfac(kind='kflr') needs a closed-form loss Hessian (CrossEntropyLoss, TokenCrossEntropyLoss, MSELoss, "
            f"BCEWithLogitsLoss without weight / pos_weight, exact classes); got {type(loss_fn).__name__}. "
            "Use kind='empirical' (any loss that decomposes over examples).")
    if z.dim() < 2:
        raise NotImplementedError(f"kfac(kind='kflr') needs batched outputs, got shape {tuple(z.shape)}.")
    # ignored targets, class weights, soft targets and label smoothing scale each position (losses: r)
    return output_hessian_sqrt(loss_fn, z.detach(), reduction, y)


@dataclass
class BatchRows:
    """One batch's rows per block: ``inputs[i]`` ``[B, T, d_in(+1)]`` (``None`` for bias blocks),
    ``grads[i]`` a list over the ``K`` columns of ``[B, T, d_out]``; ``weight`` the batch's loss
    weight, ``share`` its share ``B_b / N`` of the examples."""

    batch_index: int
    weight: float
    share: float
    inputs: list[Tensor | None]
    grads: list[list[Tensor]]


def _check_coverage(blocks, params_by_name, inputs, grads0, pgrads) -> None:
    """Autograd's gradient of the first column equals the one rebuilt from the recorded rows, per block.

    A weight block compares projections, ``grad_W v`` with ``g^T (x v)`` for a fixed
    pseudo-random ``v`` (entries of both signs), which costs ``O(rows (d_in + d_out))``
    instead of the ``rows d_in d_out`` of rebuilding ``g^T x``; the tolerance
    ``0.1 sqrt(eps)`` is relative to ``|g|^T (|x| |v|)`` (the sum of the absolute terms,
    which bounds the rounding of either side).  A bias block compares ``sum_rows g``.
    """
    gaps = []  # per block: max |rebuilt - truth| and the rounding scale, read back at once
    for i, blk in enumerate(blocks):
        g = grads0[i].reshape(-1, grads0[i].shape[-1])
        truth = [pgrads[n] for n in blk.param_names]
        truth = [t if t is not None else torch.zeros_like(params_by_name[n]) for t, n in zip(truth, blk.param_names)]
        if blk.how == "bias":
            rebuilt, truth = g.sum(0), truth[0].reshape(-1)
            scale = g.abs().sum(0)
        else:
            x = inputs[i].reshape(-1, inputs[i].shape[-1])
            v = _weights(x.shape[1], x.device, x.dtype, _COVERAGE_STREAM)
            rebuilt = g.T @ (x @ v)
            if blk.how == "joint":  # [W | b] v
                truth = truth[0].reshape(truth[0].shape[0], -1) @ v[:-1] + truth[1] * v[-1]
            else:
                truth = truth[0].reshape(g.shape[1], -1) @ v
            scale = g.abs().T @ (x.abs() @ v.abs())
        gaps += [(rebuilt - truth).abs().max(), scale.max()]
    values = torch.stack([t.to(gaps[0].device) for t in gaps]).tolist()  # one host sync
    info = torch.finfo(grads0[0].dtype)
    for blk, dev, bound in zip(blocks, values[0::2], values[1::2]):
        if dev > math.sqrt(info.eps) * 1e-1 * max(bound, info.tiny):
            raise ValueError(
                f"kfac: the gradient of {blk.param_names} is not the sum over the calls of module(s) {blk.modules}: "
                "the parameter is also used outside them (a functional call such as F.linear(x, self.weight) "
                "in a custom forward, or a weight tied to an unsupported module such as nn.Embedding). "
                "Leave it out with params= or route every use through Linear/Conv2d modules.")


def capture_rows(model: nn.Module, loss_fn, loop: BatchLoop, blocks: list[LayerBlock], params_by_name: dict,
                 *, kind: str, mc_samples: int, seed_of_batch, mode: str) -> Iterator[BatchRows]:
    """One forward and ``K`` output-gradient backwards per batch of ``loop``; yields :class:`BatchRows`.

    ``seed_of_batch(b)`` seeds the label sampler of batch ``b``.  Hooks are removed and the
    model's flags/buffers restored when the iteration ends or fails.
    """
    if mode == "train" and _dropout_modules(model):
        raise ValueError(f"mode='train' with active dropout ({_dropout_modules(model)}) gives a random matrix; "
                         "use mode='eval' (the default) or set dropout p=0.")
    if mode == "train" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError("kfac: mode='train' with BatchNorm couples the examples of a batch (batch statistics), "
                         "so per-example factors are undefined; use mode='eval' (running statistics).")
    reduction = loop.reduction
    module_names = sorted({mn for blk in blocks for mn in blk.modules})
    calls: dict[str, list[tuple[nn.Module, Tensor, Tensor]]] = {}

    def record(m, inp, out, name):
        if not isinstance(out, Tensor) or not out.requires_grad:
            raise ValueError(f"kfac: the output of module {name!r} does not require grad; its parameters must "
                             "have requires_grad=True.")
        calls.setdefault(name, []).append((m, inp[0].detach(), out))

    hooks = [model.get_submodule(mn).register_forward_hook(lambda m, i, o, mn=mn: record(m, i, o, mn))
             for mn in module_names]
    checked = False
    try:
        for b, X, y, w in loop:
            calls.clear()
            with model_state(model, mode), torch.enable_grad():
                z = forward(model, X, loop.adapter, loop.device)
                if not isinstance(z, Tensor):
                    raise TypeError(f"kfac: the model must return a tensor, got {type(z).__name__}.")
                if loss_fn(z.detach(), y).numel() != 1:
                    raise ValueError("The loss must be a scalar (reduction 'mean' or 'sum').")
                gen = torch.Generator(device=z.device)
                gen.manual_seed(seed_of_batch(b))
                S = output_factor(kind, loss_fn, z, y, reduction, mc_samples, gen)
                missing = [mn for mn in module_names if mn not in calls]
                if missing:
                    raise ValueError(f"kfac: module(s) {missing} were not called by the model's forward.")
                inputs, outs, mods = [], [], []
                for blk in blocks:
                    xs = [input_rows(m, x) for mn in blk.modules for m, x, _ in calls[mn]]
                    outs.append([o for mn in blk.modules for _, _, o in calls[mn]])
                    mods.append([m for mn in blk.modules for m, _, _ in calls[mn]])
                    if len({x.shape[0] for x in xs}) != 1:
                        raise ValueError(f"kfac: the calls of {blk.modules} see different batch sizes.")
                    if blk.how == "bias":
                        inputs.append(None)
                        continue
                    x = torch.cat(xs, 1)
                    if blk.how == "joint":
                        x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1)
                    inputs.append(x)
                flat_outs = [o for os in outs for o in os]
                grads = [[] for _ in blocks]
                K = S.shape[0]
                for k in range(K):
                    check_now = not checked and k == 0
                    targets = flat_outs + ([params_by_name[n] for blk in blocks for n in blk.param_names]
                                           if check_now else [])
                    got = torch.autograd.grad(z, targets, grad_outputs=S[k], retain_graph=k < K - 1,
                                              allow_unused=True)
                    pos = 0
                    for i, os in enumerate(outs):
                        rows = [grad_rows(m, g if g is not None else torch.zeros_like(o))
                                for m, o, g in zip(mods[i], os, got[pos:pos + len(os)])]
                        pos += len(os)
                        grads[i].append(torch.cat(rows, 1))
                    if check_now:
                        pnames = [n for blk in blocks for n in blk.param_names]
                        _check_coverage(blocks, params_by_name, inputs, [g[0] for g in grads],
                                        dict(zip(pnames, got[pos:])))
                        checked = True
            calls.clear()
            yield BatchRows(b, w, X.batch_size / loop.num_data, inputs, grads)
    finally:
        calls.clear()
        for h in hooks:
            h.remove()
