"""Hessian-free / Gauss-Newton / Fisher training: the damped Newton-CG optimizer.

Each step builds a curvature operator ``C`` (GGN, Hessian or Fisher of the loss on the
step's batch, over exactly the optimizer's parameters), solves the damped Newton
system ``(C + λ I) d = -g`` by conjugate gradients (warm-started from the previous
step's direction, decayed), moves to ``θ + lr·d`` and adapts ``λ`` with the
Levenberg-Marquardt rule of Martens (2010), "Deep learning via Hessian-free
optimization": with the reduction ratio

    ρ = (f(θ + s) - f(θ)) / (gᵀs + ½ sᵀ C s),      s = lr·d,

measured on the same batch against the *undamped* quadratic model, ``λ ← 3/2·λ`` if
``ρ < 1/4`` and ``λ ← 2/3·λ`` if ``ρ > 3/4``.  A step whose direction or trial loss is
not finite never reaches the parameters: it is rejected and ``λ`` is increased.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from curvature import ConvergenceWarning

from . import _flat_params as fp
from ._torch_optim import OptimizerConventions, check_lr, lr_value

__all__ = ["NewtonCG", "diagonal_preconditioner"]

#: Martens' thresholds on the reduction ratio ρ.
RHO_LOW = 0.25
RHO_HIGH = 0.75


def reduction_ratio(actual: float, predicted: float) -> float:
    """``ρ = actual / predicted`` for a predicted reduction ``predicted < 0``; NaN otherwise.

    ``actual = f(θ+s) - f(θ)`` and ``predicted = gᵀs + ½ sᵀCs`` (both negative for a
    good step); ``ρ = 1`` means the quadratic model was exact.
    """
    if not (predicted < 0) or not math.isfinite(actual):
        return float("nan")
    return actual / predicted


def diagonal_preconditioner(
    model: torch.nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], *, exponent: float = 0.75
) -> "DiagonalPreconditioner":
    """Martens' (2010) CG preconditioner ``M = (diag(Σ_i ∇ℓ_i∇ℓ_iᵀ) + λ)^exponent``, as a factory.

    The factory returns ``M⁻¹`` as a ``curvature.DiagonalOperator`` (what CG applies).

    ``ℓ_i = loss_fn(model(x_i), y_i)`` is the loss of example ``i`` alone (per-example
    gradients by ``torch.func.vmap`` over ``torch.func.grad``; the batch's reduction
    decides whether the sum is averaged: ``reduction="mean"`` divides by the batch
    size).  Pass the result as ``NewtonCG(..., preconditioner=diagonal_preconditioner(model,
    loss_fn))``.  Cost per step: one vmapped per-example gradient pass; memory ``B·n``
    (the per-example gradients of one batch).  The model must not hold BatchNorm in
    training mode (examples are evaluated one at a time, in the model's current mode).
    The factory is an object (not a closure), so an optimizer holding it can be
    deep-copied (the copy's factory uses the copied model) and pickled.
    """
    return DiagonalPreconditioner(model, loss_fn, exponent=exponent)


class DiagonalPreconditioner:
    """The factory of :func:`diagonal_preconditioner`: ``(params, batch, damping) -> DiagonalOperator``."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], *,
                 exponent: float = 0.75) -> None:
        if not exponent > 0:
            raise ValueError(f"Invalid exponent value: {exponent!r} (must be > 0).")
        self.model = model
        self.loss_fn = loss_fn
        self.exponent = exponent

    def __call__(self, params: list[Tensor], batch, damping: float):
        from curvature import DiagonalOperator

        model, loss_fn = self.model, self.loss_fn
        X, y = fp._split_batch(batch, "diagonal_preconditioner")
        names = {id(p): n for n, p in model.named_parameters()}
        missing = [i for i, p in enumerate(params) if id(p) not in names]
        if missing:
            raise ValueError(f"diagonal_preconditioner: parameter(s) {missing} are not parameters of its model; "
                             "build the preconditioner on the model the optimizer trains.")
        keys = [names[id(p)] for p in params]
        others = {n: p.detach() for n, p in model.named_parameters() if n not in set(keys)}

        def loss_i(ps, xi, yi):
            z = torch.func.functional_call(model, {**others, **dict(zip(keys, ps))}, (xi.unsqueeze(0),))
            return loss_fn(z, yi.unsqueeze(0))

        detached = tuple(p.detach() for p in params)
        with torch.enable_grad():
            grads = torch.func.vmap(torch.func.grad(loss_i), in_dims=(None, 0, 0))(detached, X, y)
        sq = torch.cat([(gi.detach() ** 2).reshape(gi.shape[0], -1) for gi in grads], dim=1).sum(0)
        if getattr(loss_fn, "reduction", "mean") == "mean":
            sq = sq / X.shape[0]
        return DiagonalOperator((sq + damping).pow(-self.exponent))


class NewtonCG(OptimizerConventions, torch.optim.Optimizer):
    r"""Damped Newton-CG (Hessian-free) optimizer on a GGN, Hessian or Fisher curvature.

    One step, at parameters ``θ`` (flat, ``n`` entries) with loss ``f`` on a batch:

    1. ``f0, g = closure()`` (loss and gradient at ``θ``);
    2. ``C`` = curvature operator at ``θ`` on the batch;
    3. ``d ≈ -(C + λI)^{-1} g`` by CG from ``x0 = decay · d_prev`` (``tol=cg_tol``,
       at most ``cg_maxiter`` products); ``s = lr · d``, rescaled to norm
       ``max_step_norm`` if longer;
    4. ``θ ← θ + s`` unless the trial is rejected (non-finite direction or trial loss,
       ``s`` not a descent direction of the model, or, with ``reject_increase``, a
       larger loss on the batch);
    5. ``λ`` adapted by the Levenberg-Marquardt rule above (``adapt_damping``), kept in
       ``[min_damping, max_damping]``; the ``k``-th rejected step in a row multiplies
       ``λ`` by ``damping_increase**k`` (a boost, as in Nielsen's LM update), so a far
       too small initial ``λ`` is escaped in a few steps.  A non-finite trial always
       increases ``λ``.

    API.  The curvature needs the model, the loss and the batch, the gradient needs a
    closure, so there are two equivalent ways to call ``step``::

        opt = NewtonCG(model.parameters(), model=model, loss_fn=loss_fn, curvature="ggn")
        loss = opt.step(batch=(X, y))            # the optimizer evaluates loss_fn(model(X), y)

        def closure():                           # or the torch.optim way (as for LBFGS)
            opt.zero_grad()
            loss = loss_fn(model(X), y)
            loss.backward()
            return loss
        loss = opt.step(closure, batch=(X, y))   # closure for loss and gradient, batch for curvature

    A closure must compute the loss on the same batch and leave the gradient in
    ``.grad`` (it is called once at ``θ`` and once at the trial point).  Without a
    closure the trial point costs one forward pass only.  A callable ``curvature``
    (``factory(params, batch) -> LinearOperator``) removes the need for ``model`` and
    ``loss_fn``; then ``batch`` may be anything the factory understands (or ``None``).
    The loss must be deterministic on a batch (no dropout noise: ``ρ`` compares two
    evaluations of it); the built-in operators evaluate the model in ``eval()`` mode.

    After ``step`` the parameters' ``.grad`` hold the gradient at the starting point.

    Args:
        params: the parameters to train (any number of tensors, one param group, one
            dtype and device; all must require grad).
        lr: scale of the Newton step ``s = lr · d`` (default 1.0: the Newton step); a number or a
            1-element tensor (read at every step, as torch.optim does).
        model: the ``torch.nn.Module`` (needed for string curvatures and ``step(batch=)``).
        loss_fn: ``loss_fn(model(X), y) -> scalar`` (e.g. ``torch.nn.MSELoss()``).
        curvature: ``"ggn"`` (default), ``"hessian"``, ``"fisher"`` (``curvature.FisherOperator``,
            ``kind`` and ``mc_samples`` through ``curvature_kwargs``) or a callable
            ``factory(params, batch) -> LinearOperator`` over exactly ``params``.
        curvature_kwargs: extra keywords for the operator's constructor.
        damping: initial ``λ >= 0`` (default 1.0: a cautious first step; the
            Levenberg-Marquardt rule lowers it within a few steps when the quadratic
            model is trustworthy, whereas too small a start wastes rejected steps).
        adapt_damping: Levenberg-Marquardt adaptation of ``λ`` (default True).
        damping_increase, damping_decrease: the factors 3/2 and 2/3 of Martens (2010).
        min_damping, max_damping: bounds on the adapted ``λ``.
        cg_tol: CG relative residual tolerance (default 1e-4; truncated Newton).
        cg_maxiter: CG iteration limit, i.e. curvature products per step (default 100).
        warm_start: start CG from the previous accepted direction times
            ``warm_start_decay`` (0.95; after a rejected step CG starts from zero).
        max_step_norm: optional bound on ``||s||`` (Euclidean).
        reject_increase: reject a step that increases the loss on the batch (default True).
        preconditioner: optional ``factory(params, batch, damping)`` returning an SPD
            ``LinearOperator`` or a callable ``R -> M⁻¹R`` (``R``: ``[n, k]``) applied by
            CG, e.g. Martens' ``(diag(F) + λ)^{-3/4}`` from per-example gradients
            (built once per step; ``damping`` is the current ``λ``).
        seed: base seed of Monte-Carlo Fisher curvature (step ``k`` uses ``seed + k``).

    Cost per step: one closure (forward + backward), building the operator, at most
    ``cg_maxiter`` (+1 with a warm start) CG products, one product for the predicted
    reduction and one trial loss evaluation.  Memory: a few flat vectors of size ``n``
    (the previous direction is kept in the state).

    The per-step diagnostics (``rho``, ``damping``, ``cg_iterations``, ``status``, ...)
    are in :attr:`info`.
    """

    _instance_attributes = ("model", "loss_fn", "curvature", "curvature_kwargs", "preconditioner")
    _flat_state = ("direction",)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float | Tensor = 1.0,
        *,
        model: torch.nn.Module | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        curvature: str | Callable[[list[Tensor], Any], Any] = "ggn",
        curvature_kwargs: dict | None = None,
        damping: float = 1.0,
        adapt_damping: bool = True,
        damping_increase: float = 1.5,
        damping_decrease: float = 2.0 / 3.0,
        min_damping: float = 1e-8,
        max_damping: float = 1e8,
        cg_tol: float = 1e-4,
        cg_maxiter: int = 100,
        warm_start: bool = True,
        warm_start_decay: float = 0.95,
        max_step_norm: float | None = None,
        preconditioner: Callable[[list[Tensor], Any, float], Any] | None = None,
        reject_increase: bool = True,
        seed: int = 0,
    ) -> None:
        fp.check_curvature_spec(curvature, model, loss_fn, type(self).__name__)
        if preconditioner is not None and not callable(preconditioner):
            raise TypeError(
                f"NewtonCG: preconditioner must be a callable factory(params, batch, damping), got "
                f"{type(preconditioner).__name__}."
            )
        defaults = dict(
            lr=lr, damping=damping, adapt_damping=adapt_damping, damping_increase=damping_increase,
            damping_decrease=damping_decrease, min_damping=min_damping, max_damping=max_damping,
            cg_tol=cg_tol, cg_maxiter=cg_maxiter, warm_start=warm_start,
            warm_start_decay=warm_start_decay, max_step_norm=max_step_norm,
            reject_increase=reject_increase, seed=seed,
        )
        super().__init__(params, defaults)
        fp.check_params(self)
        self.model = model
        self.loss_fn = loss_fn
        self.curvature = curvature
        self.curvature_kwargs = dict(curvature_kwargs or {})
        self.preconditioner = preconditioner

    def _check_param_group(self, group: dict) -> None:
        check_lr(group["lr"], allow_zero=False)
        fp.check_nonnegative("damping", group["damping"])
        if not group["damping_increase"] > 1:
            raise ValueError(f"Invalid damping_increase value: {group['damping_increase']!r} (must be > 1).")
        if not 0 < group["damping_decrease"] < 1:
            raise ValueError(f"Invalid damping_decrease value: {group['damping_decrease']!r} (must be in (0, 1)).")
        fp.check_nonnegative("min_damping", group["min_damping"])
        fp.check_positive("max_damping", group["max_damping"])
        if group["min_damping"] > group["max_damping"]:
            raise ValueError(f"Invalid damping bounds: min_damping={group['min_damping']} > "
                             f"max_damping={group['max_damping']}.")
        fp.check_positive("cg_tol", group["cg_tol"])
        fp.check_int_at_least("cg_maxiter", group["cg_maxiter"], 1)
        if not 0 <= group["warm_start_decay"] <= 1:
            raise ValueError(f"Invalid warm_start_decay value: {group['warm_start_decay']!r} (must be in [0, 1]).")
        if group["max_step_norm"] is not None:
            fp.check_positive("max_step_norm", group["max_step_norm"])

    # ----------------------------------------------------------------- state
    def _global_state(self, params: list[Tensor]) -> dict:
        # As in LBFGS, the optimizer-wide state lives in the first parameter's slot.
        state = self.state[params[0]]
        if "step" not in state:
            state["step"] = 0
            state["num_params"] = sum(p.numel() for p in params)
            state["damping"] = float(self.param_groups[0]["damping"])
            state["direction"] = None
            state["rejections"] = 0
            state["info"] = {}
        return state

    @property
    def damping(self) -> float:
        """The current damping ``λ``."""
        params = fp.check_params(self)
        return self._global_state(params)["damping"]

    @property
    def info(self) -> dict:
        """Diagnostics of the last step: ``loss``, ``trial_loss``, ``predicted_reduction``,
        ``actual_reduction``, ``rho``, ``damping`` (used), ``next_damping``,
        ``cg_iterations``, ``cg_converged``, ``step_norm``, ``status``, ``accepted``."""
        params = fp.check_params(self)
        return dict(self._global_state(params)["info"])

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, batch: Any = None, curvature_batch: Any = None):
        """One damped Newton-CG step.

        Args:
            closure: re-evaluates the model on the batch, calls ``backward()`` and
                returns the loss (optional when ``model``, ``loss_fn`` and ``batch``
                are given).
            batch: the batch ``(X, y)`` the curvature is built on (for a callable
                curvature: whatever the factory takes).
            curvature_batch: optionally a smaller batch for the curvature only (Martens
                2010 uses a fraction of the gradient batch); ``ρ`` is still measured on
                ``batch``.

        Returns:
            The loss at the starting point, as returned by the closure.

        Raises:
            FloatingPointError: the loss or gradient at the current point is not finite
                (nothing is changed).
        """
        name = type(self).__name__
        params = fp.check_params(self)
        group = self.param_groups[0]
        state = self._global_state(params)

        closure, own_closure, loss, f0, g = fp.start_step(self, closure, batch, self.model, self.loss_fn)
        state["step"] += 1
        lam = state["damping"]
        info: dict[str, Any] = dict(
            loss=f0, damping=lam, trial_loss=float("nan"), predicted_reduction=float("nan"),
            actual_reduction=float("nan"), rho=float("nan"), cg_iterations=0, cg_converged=False,
            step_norm=0.0, grad_norm=float(torch.linalg.vector_norm(g)), accepted=False,
        )
        if info["grad_norm"] == 0.0:
            info.update(status="zero gradient", next_damping=lam)
            state["info"] = info
            return loss

        theta = fp.gather_flat(params)
        cbatch = batch if curvature_batch is None else curvature_batch
        direction, s, predicted, status = self._direction(params, cbatch, g, lam, state, info)
        if status is None:
            fp.set_flat_(params, theta + s)
            try:
                f1 = self._trial_loss(closure, own_closure, batch, name)
            except BaseException:
                fp.set_flat_(params, theta)  # an error in the closure leaves θ as it was
                raise
            actual = f1 - f0
            rho = reduction_ratio(actual, predicted)
            info.update(trial_loss=f1, actual_reduction=actual, rho=rho)
            if not math.isfinite(f1):
                status = "rejected: non-finite trial loss"
            elif group["reject_increase"] and actual > 0:
                status = "rejected: loss increased"
            else:
                status = "accepted"
            if status != "accepted":
                fp.set_flat_(params, theta)
            if not own_closure:
                fp.set_flat_grad_(params, g)  # .grad: the gradient the step was computed from

        info["status"] = status
        info["accepted"] = status == "accepted"
        # Warm start only from an accepted direction: a rejected one (often a blow-up along
        # negative or underestimated curvature) would seed the next solve with the same error.
        state["direction"] = direction if info["accepted"] else None
        state["rejections"] = 0 if info["accepted"] else state.get("rejections", 0) + 1
        state["damping"] = self._next_damping(lam, info["rho"], status, group, state["rejections"])
        info["next_damping"] = state["damping"]
        state["info"] = info
        return loss

    def _direction(self, params, batch, g, lam, state, info):
        """Solve for the direction; returns ``(d, s, predicted, reject_status_or_None)``."""
        group = self.param_groups[0]
        name = type(self).__name__
        with torch.enable_grad():
            op = fp.build_curvature(
                self.curvature, params, batch, model=self.model, loss_fn=self.loss_fn,
                curvature_kwargs=self.curvature_kwargs, seed=group["seed"] + state["step"], name=name,
            )
            A = op.damped(lam) if lam > 0 else op
            x0 = None
            if group["warm_start"] and state["direction"] is not None and group["warm_start_decay"] > 0:
                x0 = group["warm_start_decay"] * state["direction"]
            precond = None if self.preconditioner is None else self.preconditioner(params, batch, lam)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)  # truncated CG is the method
                    d, cg = A.solve(
                        -g, method="cg", tol=group["cg_tol"], maxiter=group["cg_maxiter"],
                        x0=x0, full_output=True, preconditioner=precond,
                    )
                info.update(cg_iterations=cg.num_iterations, cg_converged=cg.converged)
            except FloatingPointError:
                return None, None, float("nan"), "rejected: non-finite direction"
            if not bool(torch.isfinite(d).all()):
                return None, None, float("nan"), "rejected: non-finite direction"
            s = lr_value(group["lr"]) * d
            norm = float(torch.linalg.vector_norm(s))
            if group["max_step_norm"] is not None and norm > group["max_step_norm"]:
                s = s * (group["max_step_norm"] / norm)
                norm = group["max_step_norm"]
            info["step_norm"] = norm
            try:
                Cs = op @ s
            except FloatingPointError:
                return None, None, float("nan"), "rejected: non-finite direction"
        predicted = float(g @ s + 0.5 * (s @ Cs))
        info["predicted_reduction"] = predicted
        if not math.isfinite(predicted):
            return None, None, predicted, "rejected: non-finite direction"
        if not predicted < 0:
            return d.detach(), s, predicted, "rejected: not a descent direction of the model"
        return d.detach(), s, predicted, None

    def _trial_loss(self, closure, own_closure, batch, name) -> float:
        if own_closure:
            return fp.loss_only(self.model, self.loss_fn, batch, name)
        _, value = fp.evaluate_closure(closure, name)
        return value

    @staticmethod
    def _next_damping(lam: float, rho: float, status: str, group: dict, rejections: int) -> float:
        non_finite = "non-finite" in status
        if non_finite or group["adapt_damping"]:
            if non_finite or not math.isfinite(rho) or rho < RHO_LOW:
                # k-th rejection in a row: factor increase**k (Nielsen-style boost), so a far
                # too small lambda is escaped in a few steps; accepted steps use increase.
                lam = lam * group["damping_increase"] ** max(rejections, 1)
            elif rho > RHO_HIGH:
                lam = lam * group["damping_decrease"]
            lam = min(max(lam, group["min_damping"]), group["max_damping"])
        return float(lam)
