"""Sharpness (the largest Hessian eigenvalue), its preconditioned form, and stability thresholds.

* :func:`sharpness` -- ``lambda_max`` (largest *algebraic*, never largest magnitude) of
  the loss Hessian or GGN on a data set, by thick-restart Lanczos
  (:func:`estimators.top_eigenvalues`), warm-startable from previous eigenvectors.
* :func:`preconditioned_sharpness` -- ``lambda_max(P^{-1/2} H P^{-1/2})`` (the eigenvalues
  of ``P^{-1} H``) with ``P`` read from a live ``Adam``/``AdamW``/``RMSprop``/``Adagrad``
  or given as a diagonal / operator; built lazily as ``D H D`` with ``D = P^{-1/2}``.
* :func:`stability_threshold` -- the largest sharpness for which the optimizer's
  update is stable on the quadratic ``1/2 lam x^2`` (the edge of stability of Cohen et
  al. 2021 / 2022): ``2/lr`` (GD), ``(2+2b)/((1-d) lr)`` (torch heavy ball with momentum
  ``b`` and dampening ``d``), ``(2+2b)/(lr (1+2b))`` (torch Nesterov), ``(2+2b1)/((1-b1) lr)``
  (Adam/AdamW, on the preconditioned sharpness), ``(2+2m)/lr`` (RMSprop with momentum
  ``m``), ``2/clr`` (Adagrad).

Why 'LA' and not 'LM': the edge-of-stability reference code calls ``eigsh`` with its
default ``which='LM'``; near a saddle the largest-magnitude eigenvalue can be a large
*negative* one, which is then reported as "sharpness".  GD's stability on a quadratic
depends on the largest algebraic eigenvalue only (negative curvature makes GD move
away, it does not oscillate), so that is what is computed here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from curvature import CallableOperator, DiagonalOperator, LinearOperator

from ._precision import default_tolerance
from ._validate import check_int
from .eigen import top_eigenvalues

__all__ = [
    "SharpnessResult",
    "sharpness",
    "preconditioned_sharpness",
    "optimizer_preconditioner",
    "stability_threshold",
    "is_adaptive",
    "curvature_operator",
]

_OPERATORS = ("hessian", "ggn")


@dataclass(frozen=True)
class SharpnessResult:
    """The top eigenpairs of a (possibly preconditioned) curvature matrix.

    Attributes:
        value: the sharpness ``lambda_max`` (largest algebraic eigenvalue), a float.
        eigenvalues: ``[k]`` the top-``k`` Ritz values, descending.
        eigenvectors: ``[n, k]`` orthonormal Ritz vectors (for a preconditioned result,
            in the scaled coordinates ``u = P^{1/2} v``); pass them as ``v0=`` to the
            next measurement to warm-start it.
        residuals: ``[k]`` ``||A x_i - theta_i x_i||``, recomputed from stored products.
        error_bounds: ``[k]`` bounds on the distance of each Ritz value to the nearest
            eigenvalue, ``min(r, r^2 / gap)``.
        converged: whether every pair met the tolerance within the product budget.
        num_matvecs: products of the curvature operator spent (the cost).
        kind: ``"hessian"``, ``"ggn"``, ``"operator"`` or ``"preconditioned"``.
        warm_start: ``[n, k + guard]`` all Ritz vectors computed (the top ``k`` and the
            guard pairs); passing the result as ``v0=`` uses this block.
    """

    value: float
    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    error_bounds: Tensor
    converged: bool
    num_matvecs: int
    kind: str
    warm_start: Tensor | None = None

    def __float__(self) -> float:
        return self.value


# --------------------------------------------------------------------------- operators
def curvature_operator(model: nn.Module, loss_fn, data, *, params=None, operator: str = "hessian",
                       **kwargs) -> LinearOperator:
    """``curvature.HessianOperator`` or ``curvature.GGNOperator`` of ``loss_fn(model(X), y)`` over ``data``.

    Extra keywords (``mode=``, ``reduction=``, ...) go to the operator.  Model in eval
    mode by default (see :class:`curvature.HessianOperator`).
    """
    import curvature

    if operator not in _OPERATORS:
        raise ValueError(f"operator must be one of {_OPERATORS}, got {operator!r}.")
    cls = curvature.HessianOperator if operator == "hessian" else curvature.GGNOperator
    return cls(model, loss_fn, data, params=params, **kwargs)


def _start_block(v0, n: int) -> Tensor | None:
    if v0 is None:
        return None
    if isinstance(v0, SharpnessResult):
        v0 = v0.eigenvectors if v0.warm_start is None else v0.warm_start
    if not isinstance(v0, Tensor) or v0.dim() not in (1, 2) or v0.shape[0] != n:
        raise ValueError(
            f"v0 must be a tensor of shape [{n}] or [{n}, j] (e.g. the previous eigenvectors) "
            f"or a SharpnessResult, got {getattr(v0, 'shape', type(v0).__name__)}."
        )
    return v0


def _top(op: LinearOperator, k: int, v0, tol: float | None, seed: int | None, max_matvecs: int | None,
         counter: LinearOperator, kind: str, guard: int = 0, scale: float | None = None) -> SharpnessResult:
    """Top-``k`` algebraic eigenpairs of ``op`` (``k + guard`` computed); cost counted on ``counter``.

    With guard pairs and a ``scale`` (the previous sharpness), the solve runs on the
    shifted operator ``op + |scale| I`` with ``tol / 2``: same Krylov spaces and residuals,
    but the relative stopping test of a guard pair becomes relative to the sharpness
    instead of to its own (possibly tiny) eigenvalue -- guard pairs only need to be
    good enough to catch a crossing.  The top pairs keep ``r <= tol * |theta|``.
    """
    if not op.is_symmetric:
        raise ValueError(f"Sharpness needs a symmetric operator; {type(op).__name__} is not marked symmetric.")
    k = check_int(k, "k")
    guard = check_int(guard, "guard", minimum=None)
    if guard < 0:
        raise ValueError(f"guard must be >= 0, got {guard}.")
    kk = min(k + guard, op.shape[0])
    if tol is None:
        tol = default_tolerance(op.dtype)
    shift = abs(float(scale)) if guard > 0 and scale is not None and math.isfinite(float(scale)) else 0.0
    A = op.damped(shift) if shift > 0 else op
    before = counter.num_matvecs
    res = top_eigenvalues(A, kk, which="LA", tol=tol / 2 if shift > 0 else tol,
                          v0=_start_block(v0, op.shape[0]), seed=seed, max_matvecs=max_matvecs)
    evals = res.eigenvalues - shift
    return SharpnessResult(
        value=float(evals[0]),
        eigenvalues=evals[:k].detach(),
        eigenvectors=res.eigenvectors[:, :k].detach(),
        residuals=res.residuals[:k].detach(),
        error_bounds=res.error_bounds[:k].detach(),
        converged=bool(res.converged.all()),
        num_matvecs=counter.num_matvecs - before,
        kind=kind,
        warm_start=res.eigenvectors.detach(),
    )


def sharpness(model, loss_fn=None, data=None, *, params=None, operator: str = "hessian", k: int = 1,
              v0=None, tol: float | None = None, seed: int | None = 0, max_matvecs: int | None = None,
              guard: int = 0, **operator_kwargs) -> SharpnessResult:
    """The sharpness ``lambda_max`` of the loss Hessian (or GGN) on ``data``, and optionally the top-k.

    Two forms::

        sharpness(model, loss_fn, (X, y))          # builds curvature.HessianOperator
        sharpness(H)                               # any symmetric curvature.LinearOperator

    Args:
        model: a ``torch.nn.Module`` -- or a symmetric ``curvature.LinearOperator``, in
            which case ``loss_fn``/``data`` must be omitted.
        loss_fn: ``loss_fn(model(X), y)`` -> scalar (mean or sum reduction).
        data: one batch ``(X, y)`` or a re-iterable of batches; the Hessian is that of the
            loss over all of it (full batch).
        params: parameters to differentiate (default: all trainable ones).
        operator: ``"hessian"`` (default) or ``"ggn"``.
        k: number of top eigenpairs (``eigenvalues`` is ``[k]``, descending).
        v0: warm start -- the previous ``SharpnessResult`` or its ``eigenvectors``
            (``[n]`` or ``[n, j]``); the solver starts with a Rayleigh-Ritz step on their
            span, so a slowly moving Hessian costs a handful of products.
        tol: relative residual tolerance ``||H x - theta x|| <= tol |theta|``; the
            eigenvalue error is at most the residual and typically ``r^2 / gap``.  Default
            by dtype: 1e-6 float64, 1e-5 float32, 3e-2 in 16 bits.
        seed: seed of the random start vector (used when ``v0`` is ``None``).
        max_matvecs: product budget (a ``curvature.ConvergenceWarning`` if exceeded).
        guard: extra eigenpairs computed beyond ``k`` (default 0).  A warm start alone
            is blind to eigenvalue *crossings*: if the previous top eigenvector is now
            (close to) the second one, it is an almost exact eigenvector, the solver
            converges on it at once and the new top eigenvalue is missed (measured: up
            to 15 % low on the EoS toy after a catapult).  With ``guard=1`` the result
            carries ``k + 1`` vectors (``warm_start``) and the next warm start resolves
            crossings within that block; it costs the products needed to converge the
            extra pair (1-2 on the EoS toy, more when that pair is poorly separated).
            :class:`~estimators.monitor.SharpnessMonitor` uses ``guard=1`` for ``k = 1``.
        **operator_kwargs: passed to the operator (``mode=``, ``reduction=`` ...).

    Returns:
        :class:`SharpnessResult`.  Cost: ``num_matvecs`` Hessian-vector products (each
        about one backward pass; the gradient graph is built once per operator).

    Raises:
        ValueError: unknown ``operator``, bad ``v0``, non-symmetric operator, a missing
            ``loss_fn``/``data`` (or extra ones with an operator).
    """
    if isinstance(model, LinearOperator):
        if loss_fn is not None or data is not None or params is not None or operator_kwargs:
            raise ValueError("sharpness(op): pass only the operator (no loss_fn, data, params) "
                             "when the first argument is a LinearOperator.")
        return _top(model, k, v0, tol, seed, max_matvecs, model, "operator", guard, _scale(v0))
    if loss_fn is None or data is None:
        raise ValueError("sharpness(model, loss_fn, data): loss_fn and data are required for a model.")
    op = curvature_operator(model, loss_fn, data, params=params, operator=operator, **operator_kwargs)
    return _top(op, k, v0, tol, seed, max_matvecs, op, operator, guard, _scale(v0))


def _scale(v0) -> float | None:
    return v0.value if isinstance(v0, SharpnessResult) else None



# ------------------------------------------------------------------ preconditioners
_ADAM = (torch.optim.Adam, torch.optim.AdamW)


def _param_groups_by_id(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


def _adam_diag(p: Tensor, state: dict, group: dict, momentum_bias_correction: bool) -> Tensor:
    beta1, beta2 = (float(b) for b in group["betas"])
    t = float(state["step"])
    v = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
    d = (v / (1.0 - beta2**t)).sqrt() + float(group["eps"])
    if momentum_bias_correction:
        d = d * (1.0 - beta1**t)
    return d


def _rmsprop_diag(p: Tensor, state: dict, group: dict) -> Tensor:
    sq = state["square_avg"]
    if group.get("centered", False):
        sq = sq - state["grad_avg"] ** 2
    return sq.sqrt() + float(group["eps"])


def _adagrad_diag(p: Tensor, state: dict, group: dict) -> Tensor:
    return state["sum"].sqrt() + float(group["eps"])


def optimizer_preconditioner(optimizer: torch.optim.Optimizer, params, *,
                             momentum_bias_correction: bool = True) -> Tensor:
    """The diagonal ``P`` (flat ``[n]``, in the order of ``params``) an adaptive optimizer divides by.

    Formulas (torch 2.x, single-tensor reference implementations; ``t = state["step"]``,
    the number of updates taken, so this is the ``P`` of the *last* update):

    * ``Adam``/``AdamW``: ``P = (1 - b1^t) (sqrt(v / (1 - b2^t)) + eps)`` with ``v =
      exp_avg_sq`` (``max_exp_avg_sq`` with ``amsgrad``).  Adam's update is
      ``x -= lr m / P`` with the raw moment ``m = b1 m + (1 - b1) g``; the factor
      ``(1 - b1^t)`` is Adam's first-moment bias correction folded into ``P`` (as in
      Cohen et al. 2022), which makes ``(2 + 2 b1) / ((1 - b1) lr)`` the exact threshold of
      the frozen-``P`` dynamics at every ``t``.  It tends to 1 (``0.995`` at ``t = 50`` for
      ``b1 = 0.9``); ``momentum_bias_correction=False`` drops it (``P = sqrt(v_hat) + eps``).
    * ``RMSprop``: ``P = sqrt(square_avg) + eps`` (``sqrt(square_avg - grad_avg^2) + eps``
      when ``centered``); no bias correction in torch's RMSprop.
    * ``Adagrad``: ``P = sqrt(sum) + eps``.

    Args:
        optimizer: a stepped optimizer of one of these classes.
        params: the parameters, in the operator's order (e.g. ``model.parameters()``).
        momentum_bias_correction: see above (Adam only).

    Raises:
        TypeError: another optimizer class.
        ValueError: a parameter the optimizer does not hold, or one without state yet
            (call ``optimizer.step()`` first).
    """
    if not isinstance(optimizer, (*_ADAM, torch.optim.RMSprop, torch.optim.Adagrad)):
        raise TypeError(
            f"Cannot read a diagonal preconditioner from {type(optimizer).__name__}; supported: Adam, AdamW, "
            "RMSprop, Adagrad. Pass the diagonal P (a tensor or DiagonalOperator) instead."
        )
    groups = _param_groups_by_id(optimizer)
    diags = []
    for i, p in enumerate(params):
        if id(p) not in groups:
            raise ValueError(f"Parameter {i} (shape {tuple(p.shape)}) is not managed by the optimizer.")
        state = optimizer.state.get(p, {})
        if not state or ("step" in state and float(state["step"]) == 0):
            raise ValueError(
                f"The optimizer has no state for parameter {i} (shape {tuple(p.shape)}) yet: its "
                "preconditioner is defined after the first optimizer.step()."
            )
        g = groups[id(p)]
        if isinstance(optimizer, _ADAM):
            d = _adam_diag(p, state, g, momentum_bias_correction)
        elif isinstance(optimizer, torch.optim.RMSprop):
            d = _rmsprop_diag(p, state, g)
        else:
            d = _adagrad_diag(p, state, g)
        diags.append(d.detach().reshape(-1).to(p.dtype))
    return torch.cat(diags)


def _scaled_operator(H: LinearOperator, P) -> LinearOperator:
    """The symmetric ``P^{-1/2} H P^{-1/2}`` (same eigenvalues as ``P^{-1} H``), lazily."""
    n = H.shape[0]
    if isinstance(P, Tensor) and P.dim() == 1:
        P = DiagonalOperator(P.to(device=H.device, dtype=H.dtype))
    if isinstance(P, DiagonalOperator):
        d = P.diag
        if d.shape[0] != n:
            raise ValueError(f"Preconditioner has {d.shape[0]} entries; the operator has n = {n}.")
        if not bool((d > 0).all()) or not bool(torch.isfinite(d).all()):
            raise ValueError("The preconditioner diagonal must be positive and finite.")
        D = P ** -0.5
        composite = D @ H @ D  # lazy DiagonalOperator algebra
        return CallableOperator(composite.matmat, (n, n), dtype=H.dtype, device=H.device, is_symmetric=True)
    if isinstance(P, LinearOperator):
        if P.shape != (n, n):
            raise ValueError(f"Preconditioner shape {P.shape} does not match the operator's {(n, n)}.")
        if n > 8192:
            raise ValueError(f"A non-diagonal preconditioner is factored densely (Cholesky); n = {n} is too "
                             "large: pass its diagonal instead.")
        Pd = P.to_dense().to(dtype=H.dtype, device=H.device)
        L, info = torch.linalg.cholesky_ex(0.5 * (Pd + Pd.T))
        if int(info) != 0:
            raise ValueError("The preconditioner is not symmetric positive definite (Cholesky failed).")

        def matmat(X: Tensor) -> Tensor:  # L^{-1} H L^{-T} X
            Y = torch.linalg.solve_triangular(L.T, X, upper=True)
            return torch.linalg.solve_triangular(L, H.matmat(Y), upper=False)

        return CallableOperator(matmat, (n, n), dtype=H.dtype, device=H.device, is_symmetric=True)
    raise TypeError(
        "preconditioner must be a torch optimizer (Adam, AdamW, RMSprop, Adagrad), a positive 1-d tensor, "
        f"a DiagonalOperator or an SPD LinearOperator; got {type(P).__name__}."
    )


def preconditioned_sharpness(model, *args, params=None, operator: str = "hessian", k: int = 1, v0=None,
                             tol: float | None = None, seed: int | None = 0, max_matvecs: int | None = None,
                             guard: int = 0, momentum_bias_correction: bool = True,
                             **operator_kwargs) -> SharpnessResult:
    """``lambda_max(P^{-1/2} H P^{-1/2})``: the sharpness an adaptive optimizer sees.

    Two forms::

        preconditioned_sharpness(model, loss_fn, (X, y), optimizer)   # P from Adam/RMSprop state
        preconditioned_sharpness(H, P)          # H: LinearOperator; P: optimizer, [n] tensor, operator

    With an optimizer, ``P`` is :func:`optimizer_preconditioner` over the operator's
    parameters; compare the result with :func:`stability_threshold` (``38/lr`` for Adam
    with ``b1 = 0.9``).  The operator is the lazy composite ``D @ H @ D`` with
    ``D = DiagonalOperator(P^{-1/2})`` (a general SPD ``P`` is Cholesky-factored,
    ``L^{-1} H L^{-T}``; small ``n`` only).

    Args:
        model: a model (then ``loss_fn, data, preconditioner`` follow) or a symmetric
            ``LinearOperator`` ``H`` (then ``preconditioner`` follows).
        params, operator, k, v0, tol, seed, max_matvecs, guard, **operator_kwargs: as in
            :func:`sharpness` (``v0`` in scaled coordinates, e.g. a previous result).
        momentum_bias_correction: Adam only, see :func:`optimizer_preconditioner`.

    Returns:
        :class:`SharpnessResult` with ``kind="preconditioned"``; ``num_matvecs`` counts
        products with ``H``.
    """
    if isinstance(model, LinearOperator):
        if len(args) != 1 or operator_kwargs or params is not None:
            raise ValueError("preconditioned_sharpness(H, P): pass the operator and the preconditioner only.")
        H, P = model, args[0]
        hparams = None
    else:
        if len(args) != 3:
            raise ValueError("preconditioned_sharpness(model, loss_fn, data, preconditioner): "
                             f"expected 3 arguments after the model, got {len(args)}.")
        loss_fn, data, P = args
        H = curvature_operator(model, loss_fn, data, params=params, operator=operator, **operator_kwargs)
        hparams = H.params
    if isinstance(P, torch.optim.Optimizer):
        if hparams is None:
            hparams = getattr(H, "params", None)
            if hparams is None:
                raise ValueError("To read P from an optimizer, H must be a model curvature operator "
                                 "(with .params); otherwise pass the diagonal P.")
        P = optimizer_preconditioner(P, hparams, momentum_bias_correction=momentum_bias_correction)
    A = _scaled_operator(H, P)
    return _top(A, k, v0, tol, seed, max_matvecs, H, "preconditioned", guard, _scale(v0))


# ------------------------------------------------------------------------ thresholds
def _single_group_value(optimizer: torch.optim.Optimizer, key: str, default=None):
    vals = {repr(g.get(key, default)) for g in optimizer.param_groups}
    if len(vals) != 1:
        raise ValueError(
            f"The optimizer's param groups disagree on {key!r} ({sorted(vals)}); a single stability "
            "threshold is only defined when all groups share it."
        )
    v = optimizer.param_groups[0].get(key, default)
    return float(v) if isinstance(v, Tensor) else v


def is_adaptive(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's threshold applies to the *preconditioned* sharpness."""
    return isinstance(optimizer, (*_ADAM, torch.optim.RMSprop, torch.optim.Adagrad))


def stability_threshold(optimizer: torch.optim.Optimizer | None = None, *, lr: float | None = None,
                        method: str = "gd", momentum: float = 0.0, dampening: float = 0.0,
                        beta1: float = 0.9) -> float:
    """The sharpness above which the optimizer's update diverges on ``1/2 lam x^2``.

    Derivation (a linear recurrence on the quadratic; diverges iff a root of its
    characteristic polynomial leaves the unit disk, which happens at ``z = -1``):

    * GD ``x -= lr g``: ``|1 - lr lam| <= 1``  ->  ``2 / lr``.
    * torch SGD heavy ball ``buf = b buf + (1 - d) g; x -= lr buf``: ``z^2 - (1 + b -
      lr (1-d) lam) z + b``  ->  ``(2 + 2b) / ((1 - d) lr)`` (``(2+2b)/lr`` for ``d = 0``).
    * torch Nesterov ``buf = b buf + g; x -= lr (g + b buf)``: ``z^2 - (1+b)(1-a) z +
      b (1-a)`` with ``a = lr lam``  ->  ``(2 + 2b) / (lr (1 + 2b))``.
    * Adam/AdamW (on ``lambda_max(P^{-1} H)``, ``P`` from :func:`optimizer_preconditioner`):
      ``m = b1 m + (1-b1) g; x -= lr m / P``  ->  ``(2 + 2 b1) / ((1 - b1) lr)`` (38/lr).
    * RMSprop (preconditioned): ``2 / lr``; with momentum ``m``: ``(2 + 2m) / lr``.
    * Adagrad (preconditioned): ``2 / clr`` with ``clr = lr / (1 + (t - 1) lr_decay)``.

    SGD's coupled ``weight_decay`` ``wd`` adds ``wd`` to every curvature, so the
    threshold on the *loss* Hessian is lowered by ``wd`` (returned).  Adam's L2 term and
    AdamW's decoupled decay are not folded in (the threshold is for the loss without
    them; AdamW's decay shifts it by ``O(lr wd)``).

    Args:
        optimizer: a torch optimizer (SGD, Adam, AdamW, RMSprop, Adagrad); its first
            param group's hyper-parameters are used (all groups must agree).
        lr, method, momentum, dampening, beta1: without an optimizer, ``method`` is
            ``"gd"``, ``"heavy_ball"``, ``"nesterov"``, ``"adam"`` or ``"rmsprop"``.

    Returns:
        The threshold (a float).  For adaptive methods it applies to the
        preconditioned sharpness (:func:`is_adaptive`).
    """
    wd = 0.0
    if optimizer is not None:
        if lr is not None or method != "gd" or momentum or dampening:
            raise ValueError("Pass either an optimizer or lr=/method=/momentum=, not both.")
        lr = _single_group_value(optimizer, "lr")
        if isinstance(optimizer, torch.optim.SGD):
            momentum = _single_group_value(optimizer, "momentum", 0.0)
            dampening = _single_group_value(optimizer, "dampening", 0.0)
            wd = _single_group_value(optimizer, "weight_decay", 0.0)
            nesterov = _single_group_value(optimizer, "nesterov", False)
            method = "gd" if momentum == 0 else ("nesterov" if nesterov else "heavy_ball")
        elif isinstance(optimizer, _ADAM):
            beta1 = float(_single_group_value(optimizer, "betas")[0])
            method = "adam"
        elif isinstance(optimizer, torch.optim.RMSprop):
            momentum = _single_group_value(optimizer, "momentum", 0.0)
            method = "rmsprop"
        elif isinstance(optimizer, torch.optim.Adagrad):
            decay = _single_group_value(optimizer, "lr_decay", 0.0)
            steps = [float(s["step"]) for s in optimizer.state.values() if "step" in s]
            t = max(steps) if steps else 1.0
            lr = lr / (1.0 + (max(t, 1.0) - 1.0) * decay)
            method = "rmsprop"
        else:
            raise TypeError(
                f"No stability threshold known for {type(optimizer).__name__}; supported: SGD (plain, heavy "
                "ball, Nesterov), Adam, AdamW, RMSprop, Adagrad. Pass lr= and method= instead."
            )
    if lr is None or not (float(lr) > 0 and math.isfinite(float(lr))):
        raise ValueError(f"lr must be a positive finite number, got {lr}.")
    lr, b = float(lr), float(momentum)
    if not 0 <= b < 1:
        raise ValueError(f"momentum must lie in [0, 1), got {b}.")
    if method == "gd":
        thr = 2.0 / lr
    elif method == "heavy_ball":
        if not 0 <= dampening < 1:
            raise ValueError(f"dampening must lie in [0, 1), got {dampening}.")
        thr = (2.0 + 2.0 * b) / ((1.0 - float(dampening)) * lr)
    elif method == "nesterov":
        thr = (2.0 + 2.0 * b) / (lr * (1.0 + 2.0 * b))
    elif method == "adam":
        if not 0 <= beta1 < 1:
            raise ValueError(f"beta1 must lie in [0, 1), got {beta1}.")
        thr = (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)
    elif method == "rmsprop":
        thr = (2.0 + 2.0 * b) / lr
    else:
        raise ValueError(f"Unknown method {method!r}; use 'gd', 'heavy_ball', 'nesterov', 'adam' or 'rmsprop'.")
    return thr - wd
