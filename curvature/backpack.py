"""Exact and Monte-Carlo curvature diagonals through BackPACK (backpack-for-pytorch).

BackPACK extends backpropagation to return the diagonal of the GGN (exact or with
``mc_samples`` sampled labels) and of the Hessian in one extended backward pass per
batch, where the matrix-free route would need ``n`` products.  We use it because it is
the best tool for exactly this; it supports ``nn.Sequential`` models of its supported
layers (Linear, Conv, activations, pooling, Flatten, ...) and CrossEntropy / MSE /
single-logit BCEWithLogits losses.  Support is checked up front against the module map
of the installed BackPACK extension: a custom ``nn.Module`` class, LayerNorm, a
multi-output ``BCEWithLogitsLoss``, ... raise ``NotImplementedError`` naming the module
and the alternatives (``op.diagonal()``, exact for small ``n``, or
``estimators.hutchinson_diagonal(op)``); there is no silent fallback.

The user's model is never modified: BackPACK's ``extend`` installs hooks and attributes,
so it runs on a copy, made once per model and cached (its parameters share the user's
storage, so values are always current; it is rebuilt when the module tree, a
hyperparameter, a hook, or a parameter's identity/storage/shape/dtype/device changes;
see :func:`_extended_copies`), in eval mode by default;
``.grad`` and the global RNG of the caller are untouched (Monte-Carlo sampling runs
under ``torch.random.fork_rng`` seeded from ``(seed, batch index)``).  Batches are
summed with the weights of :class:`~curvature._empirical_risk.BatchLoop` (mean or sum
reduction), so the result over a DataLoader equals the result on the concatenated data.

Functions return a :class:`~curvature.DiagonalOperator` (``param_shapes`` set): use
``.diag`` for the flat vector, or multiply it as a preconditioner.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
import weakref

import numpy as np
import torch
from torch import nn

from . import distributed
from ._empirical_risk import BatchLoop, check_loss, forward, model_state, resolve_params
from .losses import mean_denominator
from .linear_operator import all_finite
from .structured import DiagonalOperator

__all__ = ["ggn_diagonal", "hessian_diagonal"]


# {user model: {"key": structure key, "work": extended copy, "named": {...}, "losses": {loss key: copy}}}
_EXTENDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _structure_key(model: nn.Module) -> tuple:
    """What the cached extended copy depends on: module tree, hyperparameters, hooks, tensor identities.

    Per module: name, class, public attributes (``stride``, ``inplace``, ...), the keys of its
    hook dicts, and per parameter / buffer its identity, storage pointer, shape, dtype
    and device.  Values of the tensors are not in the key: the copy shares their storage.
    """
    items = []
    for name, m in model.named_modules():
        attrs = tuple(sorted((k, repr(v)) for k, v in vars(m).items() if not k.startswith("_") and k != "training"))
        hooks = tuple(tuple(getattr(m, h, {})) for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                                         "_backward_pre_hooks"))
        tensors = tuple((k, None if t is None else (id(t), t.data_ptr(), t.shape, t.dtype, t.device))
                        for d in (m._parameters, m._buffers) for k, t in d.items())
        items.append((name, type(m), attrs, hooks, tensors))
    return tuple(items)


def _loss_key(loss_fn) -> tuple:
    return (id(loss_fn), type(loss_fn),
            tuple(sorted((k, repr(v)) for k, v in vars(loss_fn).items() if not k.startswith("_"))))


def _extended_copies(model: nn.Module, loss_fn, names, check=None, check_key=None) -> tuple[nn.Module, object, dict]:
    """BackPACK-extended copies of ``model`` and ``loss_fn`` (the user's objects stay untouched).

    The copy is made once per model and cached (weakly keyed on the model): its
    parameters are new leaves SHARING the storage of the user's parameters (values are
    always current, ``.grad`` and BackPACK's attributes land on the copy) and its buffers
    are the user's buffer tensors.  It is rebuilt when :func:`_structure_key` changes (a
    module added or replaced, a hyperparameter or hook changed, a parameter re-assigned or
    its storage swapped through ``.data = ...``).  Only the parameters named in ``names``
    require grad in the copy.  ``check()`` (a support check of the model, raising) runs
    once per ``check_key`` and cached copy.  Returns ``(model copy, loss copy, {name:
    parameter of the copy})``.
    """
    import backpack

    key = _structure_key(model)
    entry = _EXTENDED.get(model)
    if entry is None or entry["key"] != key:
        hooked = [name or "<model>" for name, m in model.named_modules()
                  if any(getattr(m, h, None) for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                                       "_backward_pre_hooks"))]
        if hooked:
            raise NotImplementedError(
                f"Module(s) {hooked} have hooks registered; BackPACK back-propagates through each module's own "
                "derivative and ignores what a hook does to its inputs/outputs (the result would be silently "
                "wrong). Remove the hooks, or use curvature.GGNOperator / HessianOperator (autograd, hooks "
                "honoured), e.g. op.diagonal() or estimators.hutchinson_diagonal(op).")
        if check is not None:
            check()
        memo = {}
        for p in model.parameters():
            memo[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
        for b in model.buffers():
            memo[id(b)] = b
        work = backpack.extend(copy.deepcopy(model, memo)).eval()  # the copy stays in eval mode (see _mode)
        entry = {"key": key, "work": work, "named": dict(work.named_parameters()), "losses": {},
                 "checked": {check_key}}
        _EXTENDED[model] = entry
    elif check is not None and check_key not in entry["checked"]:
        check()
        entry["checked"].add(check_key)
    lkey = _loss_key(loss_fn)
    if lkey not in entry["losses"]:
        entry["losses"] = {lkey: backpack.extend(copy.deepcopy(loss_fn))}
    named = entry["named"]
    for n, p in named.items():
        p.requires_grad_(n in names)
        p.grad = None
    return entry["work"], entry["losses"][lkey], named


def resolve_seed(seed) -> int:
    """``seed`` as a non-negative integer: ``None`` means 0 (reproducible by default); ints only.

    Raises:
        TypeError: a non-integer (``1.5``, ``True``, a string).
        ValueError: a negative seed or one of 2**63 or more.
    """
    if seed is None:
        return 0
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}.")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}.")
    return int(seed)


def batch_seed(seed: int, batch_index: int) -> int:
    """The seed of batch ``batch_index`` derived from ``seed`` (the one derivation of the package's samplers)."""
    state = np.random.SeedSequence([int(seed), batch_index]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def check_finite_params(names, tensors, caller: str) -> None:
    """Raise ``ValueError`` naming the parameters with NaN/inf entries (before any computation)."""
    if all_finite(*tensors):  # one host sync
        return
    bad = [n for n, p in zip(names, tensors) if not all_finite(p)]
    if bad:
        raise ValueError(f"{caller}: parameter(s) {bad} have NaN/inf entries; the curvature is undefined. "
                         "Check the training run that produced them (learning rate, loss scale).")


@contextlib.contextmanager
def _seeded_batch(seed: int | None, batch_index: int, device: torch.device):
    """Seed torch's generator of ``device`` from ``(seed, batch_index)`` inside, restore it after; ``None``: no-op.

    BackPACK's ``DiagGGNMC`` samples with the global generator of the output's device (it
    takes no generator argument), so that one generator is saved, seeded and put back (the
    CPU generator is saved too on CUDA: nothing else is touched).  Cost: two copies of the
    generator state (5 KB on the CPU) per batch.
    """
    if seed is None:  # nothing random in this extension
        yield
        return
    gens = [torch.default_generator]
    if device.type == "cuda":
        gens.append(torch.cuda.default_generators[device.index if device.index is not None
                                                  else torch.cuda.current_device()])
    states = [g.get_state() for g in gens]
    s = batch_seed(seed, batch_index)
    try:
        for g in gens:
            g.manual_seed(s)  # not torch.manual_seed: it also seeds every other backend
        yield
    finally:
        for g, state in zip(gens, states):
            g.set_state(state)


def _mode(work: nn.Module, mode: str):
    """The model state of a pass on the cached copy ``work``: eval is its permanent state (nothing to
    set or restore); train mode goes through :func:`model_state` (buffers restored after each pass)."""
    return contextlib.nullcontext() if mode == "eval" else model_state(work, mode)


def _backpack_passes(loop: BatchLoop, work: nn.Module, lf, ext, named: dict, names: list[str],
                     attribute: str, *, seed: int, mode: str, device: torch.device,
                     check_output, describe_error):
    """One BackPACK backward per batch of ``loop``, on the extended copy ``work``.

    Yields ``(batch_index, X, weight, values)`` with ``values`` the extension's quantity
    (``attribute``) per parameter in ``names``, read off and removed from the copy's
    parameters (their ``.grad`` is cleared too).  ``check_output(z)`` may reject the
    model output; ``describe_error(exc)`` words a ``NotImplementedError`` BackPACK raises.
    """
    import backpack

    for b, X, y, w in loop:
        with _seeded_batch(seed, b, device), _mode(work, mode), torch.enable_grad():
            z = forward(work, X, loop.adapter, device)
            check_output(z, y)
            loss = lf(z, y)
            if loss.numel() != 1:
                raise ValueError("The loss must be a scalar (reduction 'mean' or 'sum').")
            with backpack.backpack(ext), warnings.catch_warnings():
                # BackPACK's module hooks fire on outputs when inputs need no grad: harmless here
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                try:
                    loss.backward()
                except NotImplementedError as exc:  # a limitation the up-front checks did not foresee
                    raise NotImplementedError(describe_error(exc)) from exc
        values = []
        for n in names:
            p = named[n]
            value = getattr(p, attribute, None)
            if value is None:
                raise RuntimeError(f"BackPACK returned no {attribute} for parameter {n!r} (unsupported layer?).")
            values.append(value)
            delattr(p, attribute)
            p.grad = None
        yield b, X, w, values


@functools.lru_cache(maxsize=None)
def _extension(extension_name: str, mc_samples: int = 1):
    """One BackPACK extension object per (name, samples): building one costs ~2 ms (its module map)."""
    from backpack import extensions

    cls = getattr(extensions, extension_name)
    return cls(mc_samples=mc_samples) if extension_name in ("DiagGGNMC", "KFAC") else cls()


def _alternative(extension_name: str) -> str:
    op = "HessianOperator" if extension_name == "DiagHessian" else "GGNOperator"
    return (
        f"Alternatives: curvature.{op}(model, loss_fn, data).diagonal() (exact, n products: for small n) "
        f"or estimators.hutchinson_diagonal(curvature.{op}(model, loss_fn, data), ...) (randomized estimate)."
    )


def _type_name(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_supported(model: nn.Module, loss_fn, ext, extension_name: str) -> None:
    """Raise ``NotImplementedError`` naming every module (and loss setting) BackPACK's ``ext`` cannot handle.

    BackPACK looks up each hooked module's exact class in the extension's module map
    (containers such as ``nn.Sequential`` are not hooked) and fails mid-backward on a
    missing one; checking the same map up front gives an error that names the module.
    """
    from backpack.utils.module_classification import is_no_op

    # The extension's {module class: module extension} map (read only; private in BackPACK 1.7).
    supported = getattr(ext, "_BackpropExtension__module_extensions", None)
    if supported is not None:
        bad = [f"{name or '<model>'!r} ({_type_name(m)})" for name, m in model.named_modules()
               if not is_no_op(m) and type(m) not in supported]
        if bad:
            raise NotImplementedError(
                f"BackPACK's {extension_name} does not support module(s) {', '.join(bad)}: it handles only "
                f"{sorted(k.__name__ for k in supported if k.__module__.startswith('torch'))} inside "
                f"nn.Sequential containers (custom nn.Module classes are not supported). "
                f"{_alternative(extension_name)}"
            )
        if type(loss_fn) not in supported:
            raise NotImplementedError(
                f"BackPACK's {extension_name} does not support the loss {_type_name(loss_fn)} (subclasses of "
                f"its losses are not recognized). {_alternative(extension_name)}"
            )
    if isinstance(loss_fn, nn.CrossEntropyLoss) and (loss_fn.weight is not None or loss_fn.ignore_index != -100):
        raise NotImplementedError(
            "BackPACK's CrossEntropyLoss supports neither class weights (weight=) nor a non-default ignore_index. "
            f"{_alternative(extension_name)}"
        )
    if isinstance(loss_fn, nn.BCEWithLogitsLoss) and (loss_fn.weight is not None or loss_fn.pos_weight is not None):
        raise NotImplementedError(
            "BackPACK's BCEWithLogitsLoss supports neither weight= nor pos_weight=. "
            f"{_alternative(extension_name)}"
        )


def _check_output(loss_fn, z: torch.Tensor, extension_name: str, y=None) -> None:
    """Refuse outputs and targets BackPACK's loss modules cannot take (before it fails or is silently wrong).

    BackPACK's cross-entropy curvature assumes integer targets, all counted, and no label
    smoothing: targets equal to ``ignore_index`` or probability targets would give a
    silently wrong diagonal, so they are refused here.
    """
    if isinstance(loss_fn, nn.CrossEntropyLoss) and y is not None:
        if loss_fn.label_smoothing != 0.0 or y.is_floating_point() or bool((y == loss_fn.ignore_index).any()):
            raise NotImplementedError(
                "BackPACK's CrossEntropyLoss supports integer targets without ignored entries (ignore_index) and "
                f"without label smoothing. {_alternative(extension_name)}"
            )
    if isinstance(loss_fn, nn.BCEWithLogitsLoss) and (z.dim() != 2 or z.shape[1] != 1):
        raise NotImplementedError(
            f"BackPACK's BCEWithLogitsLoss supports only one logit per example (model output [N, 1]); got "
            f"output shape {tuple(z.shape)} (multi-output / multi-label BCE). {_alternative(extension_name)}"
        )
    if isinstance(loss_fn, nn.MSELoss) and z.dim() != 2:
        raise NotImplementedError(
            f"BackPACK's MSELoss supports only outputs of shape [N, D]; got {tuple(z.shape)}. "
            f"{_alternative(extension_name)}"
        )


def _backpack_diagonal(model, loss_fn, data, params, extension_name: str, attribute: str,
                       mc_samples: int = 1, seed: int = 0, mode: str = "eval",
                       check_data: bool = True, process_group=None) -> DiagonalOperator:
    try:
        from backpack import extensions
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError("curvature.backpack needs backpack-for-pytorch (pip install backpack-for-pytorch).") from exc
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}.")
    reduction = check_loss(loss_fn)
    if not isinstance(loss_fn, (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)):
        raise NotImplementedError(
            f"BackPACK diagonals support CrossEntropyLoss, MSELoss and BCEWithLogitsLoss, got "
            f"{type(loss_fn).__name__}. {_alternative(extension_name)}"
        )
    ext = _extension(extension_name, mc_samples)
    model, params, group = distributed.prepare(model, data, process_group, params)
    names, chosen = resolve_params(model, params)
    seed = resolve_seed(seed)
    work, lf, named = _extended_copies(model, loss_fn, names, check=lambda: _check_supported(
        model, loss_fn, ext, extension_name), check_key=(extension_name, _loss_key(loss_fn)))
    device = chosen[0].device
    mc = extension_name == "DiagGGNMC"
    signature = distributed.describe(extension_name, loss_fn, names, [p.shape for p in chosen], mode=mode,
                                     mc_samples=mc_samples if mc else None, seed=seed if mc else None)
    loop = BatchLoop(data, device, reduction, order_sensitive=mc, check=check_data,
                     batch_sensitive=mode == "train",
                     denominator=lambda X, y: mean_denominator(loss_fn, y, X.batch_size),
                     process_group=group, signature=signature)

    # one flat accumulator (zeros on a rank with an empty shard), summed over ranks in one all_reduce
    diag = torch.zeros(sum(p.numel() for p in chosen), dtype=chosen[0].dtype, device=device)
    acc = list(torch.split(diag, [p.numel() for p in chosen]))
    with loop.shards.summed([diag]):
        passes = _backpack_passes(
            loop, work, lf, ext, named, names, attribute, seed=seed if mc else None,
            mode=mode, device=device, check_output=lambda z, y: _check_output(loss_fn, z, extension_name, y),
            describe_error=lambda exc: (f"BackPACK's {extension_name} cannot handle this model/loss: {exc}. "
                                        f"{_alternative(extension_name)}"),
        )
        for _, _, w, values in passes:
            for a, value in zip(acc, values):
                a.add_(value.detach().reshape(-1), alpha=w)
    if not all_finite(diag):  # one check on the result instead of one per parameter
        check_finite_params(names, chosen, extension_name)
        raise ValueError(f"{extension_name}: the diagonal has NaN/inf entries although the parameters are finite; "
                         "check the data for NaN/inf (or an overflowing loss).")
    return DiagonalOperator(diag, param_shapes=[p.shape for p in chosen])


def ggn_diagonal(
    model: nn.Module,
    loss_fn,
    data,
    params=None,
    *,
    kind: str = "exact",
    mc_samples: int = 1,
    seed: int | None = 0,
    mode: str = "eval",
    check_data: bool = True,
    process_group=None,
) -> DiagonalOperator:
    """Diagonal of the GGN (``kind="exact"``) or of its Monte-Carlo estimate (``kind="mc"``).

    Args:
        model: an ``nn.Sequential`` of BackPACK-supported layers.
        loss_fn: ``nn.CrossEntropyLoss`` (no class weights, default ``ignore_index``),
            ``nn.MSELoss`` (outputs ``[N, D]``) or ``nn.BCEWithLogitsLoss`` (one logit
            per example, output ``[N, 1]``); reduction "mean" or "sum".
        data: a batch ``(X, y)`` or an iterable of batches.
        params: parameters (tensors of ``model`` or names); default all trainable.
        kind: ``"exact"`` (BackPACK ``DiagGGNExact``) or ``"mc"`` (``DiagGGNMC``).
        mc_samples: sampled labels per example for ``kind="mc"``.
        seed: seed of the sampled labels (per batch: seeded from ``(seed, batch index)``);
            ``None`` means 0.
        mode: ``"eval"`` (default) or ``"train"`` (BackPACK refuses train-mode BatchNorm).
        check_data: verify that the data are the same on every pass.
        process_group: data parallel (see :mod:`curvature.distributed`): every rank of
            the group passes its shard of the data and gets the diagonal of the whole
            data set (one ``all_reduce`` of the ``n`` entries; a ``DistributedDataParallel``
            model is unwrapped).  For ``kind="mc"`` the labels of global batch ``b`` are
            seeded from ``(seed, b)``, so shards holding consecutive batches in rank order
            give the single-process result.

    Returns:
        A :class:`~curvature.DiagonalOperator` ``[n]`` with ``param_shapes``.

    Raises:
        NotImplementedError: before any computation, for a module BackPACK's extension
            does not support (named with its qualified name and type: LayerNorm, a custom
            ``nn.Module`` class, ...), an unsupported loss or loss setting, or a
            multi-output ``BCEWithLogitsLoss``; the message names the alternatives
            (``GGNOperator(...).diagonal()`` or ``estimators.hutchinson_diagonal``).
        ValueError: a parameter with NaN/inf entries (named).

    Cost: one forward and one extended backward pass per batch (exact: about ``C``
    backward passes' worth of work for ``C`` outputs; MC: ``mc_samples``).
    """
    if kind not in ("exact", "mc"):
        raise ValueError(f"kind must be 'exact' or 'mc', got {kind!r}.")
    if int(mc_samples) < 1:
        raise ValueError(f"mc_samples must be >= 1, got {mc_samples}.")
    if kind == "exact":
        return _backpack_diagonal(model, loss_fn, data, params, "DiagGGNExact", "diag_ggn_exact",
                                  mode=mode, check_data=check_data, process_group=process_group)
    return _backpack_diagonal(model, loss_fn, data, params, "DiagGGNMC", "diag_ggn_mc",
                              mc_samples=int(mc_samples), seed=seed, mode=mode, check_data=check_data,
                              process_group=process_group)


def hessian_diagonal(model: nn.Module, loss_fn, data, params=None, *, mode: str = "eval",
                     check_data: bool = True, process_group=None) -> DiagonalOperator:
    """Exact diagonal of the loss Hessian through BackPACK's ``DiagHessian``.

    Same arguments as :func:`ggn_diagonal` (without ``kind``; ``process_group=`` for the
    data-parallel diagonal); returns a
    :class:`~curvature.DiagonalOperator` ``[n]`` with ``param_shapes``.  Needs
    BackPACK's second-derivative support for every layer (Linear, Conv, smooth
    activations, ...).
    """
    return _backpack_diagonal(model, loss_fn, data, params, "DiagHessian", "diag_h",
                              mode=mode, check_data=check_data, process_group=process_group)
