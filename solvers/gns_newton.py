"""Gradient-regularized Newton training with the adaptive gradient-normalized-smoothness search.

The optimizer face of Semenov, Jaggi, Doikov (2025), "Gradient-Normalized Smoothness
for Optimization with Approximate Hessians" (Algorithms 1 and 3): at ``θ`` with
gradient ``g`` and curvature ``C`` (GGN, Hessian or Fisher of the batch loss),

    λ = ||g||_* / γ,      Δ = -(C + λ B)^{-1} g    (CG),

and the trial ``θ + Δ`` is accepted when the sufficient-decrease test

    f(θ) - f(θ + Δ) >= ||∇f(θ + Δ)||_*² / (8 λ)

holds (or, at the rounding floor of ``f``, ``f`` changed by less than its rounding
level while the gradient halved); then ``γ ← 2γ`` (optimistic, for the next step).
Otherwise ``γ ← γ/2`` and the step is re-solved with the same operator (more
regularization).  If no try passes, the parameters stay where they were (the safe
variant of the official search).  The functional face of the same method is
``solvers.minimize(f, x0, method="gns")`` (:mod:`solvers.gns`); this module is its
``torch.optim`` face for models and mini-batches.
``B`` is the metric (identity by default) and ``||g||_* = sqrt(gᵀB⁻¹g)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from curvature import LinearOperator

from . import _flat_params as fp
from ._torch_optim import OptimizerConventions, check_lr, lr_value
from ._oracle import rounding_level

__all__ = ["GNSNewton", "sufficient_decrease"]


def sufficient_decrease(f0: float, f1: float, trial_grad_dual_norm: float, lam: float) -> bool:
    """The GNS acceptance test ``f0 - f1 >= ||g⁺||_*² / (8 λ)`` (finite values only)."""
    if not (math.isfinite(f1) and math.isfinite(trial_grad_dual_norm)):
        return False
    return f0 - f1 >= trial_grad_dual_norm**2 / (8.0 * lam)


def _accept(f0: float, f1: float, g0: float, g1: float, lam: float, dtype: torch.dtype) -> bool:
    """:func:`sufficient_decrease`, or (as in :func:`solvers.minimize`'s GNS) a change of ``f``
    below its rounding level together with a halved gradient: near a minimizer the
    decrease ``~||g||²`` drops under the resolution of ``f`` before ``g`` does."""
    if sufficient_decrease(f0, f1, g1, lam):
        return True
    return math.isfinite(f1) and abs(f1 - f0) <= rounding_level(f0, dtype) and g1 <= 0.5 * g0


class GNSNewton(OptimizerConventions, torch.optim.Optimizer):
    r"""Gradient-regularized Newton with the adaptive GNS search over ``γ``.

    One step at ``θ``: ``f0, g = closure()``; build the curvature ``C`` once; then for
    up to ``max_tries`` tries: ``λ = ||g||_*/γ``, solve ``(C + λB) d = -g`` by CG,
    evaluate the closure at ``θ + lr·d`` (loss and gradient, on the same batch) and
    accept if ``f0 - f1 >= ||g1||_*²/(8λ)`` (then ``γ ← min(2γ, gamma_max)``), else
    ``γ ← max(γ/2, gamma_min)``.  Trials with non-finite values are rejected like
    failed tests; parameters never receive NaN/inf.  ``lr = 1`` is the method as
    analysed (the step is then at most ``γ`` long in the ``B``-norm).

    API as :class:`~solvers.NewtonCG`: ``step(batch=(X, y))`` with ``model`` and
    ``loss_fn`` given, or ``step(closure, batch=(X, y))`` with a closure that zeroes the
    gradients, computes the loss on the batch, calls ``backward()`` and returns the
    loss (here every try needs the gradient at the trial point, so the closure is
    called once per try either way).  ``curvature`` may be a callable
    ``factory(params, batch) -> LinearOperator``.  After ``step`` the ``.grad`` fields
    hold the gradient at the starting point.

    Args:
        params: the parameters (one param group, one dtype/device, all trainable).
        lr: step scale (default 1.0; a number or a 1-element tensor, read at every step).
        model, loss_fn, curvature, curvature_kwargs, seed: as for :class:`~solvers.NewtonCG`.
        gamma0: initial ``γ`` (default 1.0, as the official code).
        gamma_min, gamma_max: bounds on ``γ``.
        max_tries: tries per step (default 40, as the official code).
        metric: SPD ``LinearOperator`` ``B`` over the parameters (default identity);
            ``||g||_*`` needs ``B.solve`` (exact for diagonal/dense metrics).
        cg_tol, cg_maxiter: tolerance of the (Lanczos-)CG solve and the most curvature
            products per step (defaults 1e-6, 100).

    The linear systems of all tries share one Krylov space (the shift ``λB`` does not
    change it), so one Lanczos run per step, stopped when the first try's system
    ``(C + λ₀B) d = -g`` has relative residual ``<= cg_tol`` (dual norm), gives the CG
    solution for every later (larger) ``λ`` without further products; every curvature
    product happens before the first trial point, so the operator is only ever used at
    ``θ``.

    Cost per step: one closure, building the operator once, at most ``cg_maxiter``
    curvature products (plus metric solves/products), then one closure (forward and
    backward) per try; on average about two tries per step (``γ`` doubles after a
    success and halves after a failure).  Memory: the Krylov basis, ``k·n`` entries
    (``k <= cg_maxiter``; twice that with a metric).  Diagnostics of the last step are
    in :attr:`info`.
    """

    _instance_attributes = ("model", "loss_fn", "curvature", "curvature_kwargs", "metric")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float | Tensor = 1.0,
        *,
        model: torch.nn.Module | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        curvature: str | Callable[[list[Tensor], Any], Any] = "ggn",
        curvature_kwargs: dict | None = None,
        gamma0: float = 1.0,
        gamma_min: float = 1e-9,
        gamma_max: float = 1e12,
        max_tries: int = 40,
        metric: LinearOperator | None = None,
        cg_tol: float = 1e-6,
        cg_maxiter: int = 100,
        seed: int = 0,
    ) -> None:
        fp.check_curvature_spec(curvature, model, loss_fn, type(self).__name__)
        defaults = dict(
            lr=lr, gamma0=gamma0, gamma_min=gamma_min, gamma_max=gamma_max, max_tries=max_tries,
            cg_tol=cg_tol, cg_maxiter=cg_maxiter, seed=seed,
        )
        super().__init__(params, defaults)
        params_list = fp.check_params(self)
        n = sum(p.numel() for p in params_list)
        if metric is not None:
            if not isinstance(metric, LinearOperator):
                raise TypeError(f"GNSNewton: metric must be a curvature.LinearOperator, got {type(metric).__name__}.")
            if tuple(metric.shape) != (n, n) or not metric.is_symmetric:
                raise ValueError(
                    f"GNSNewton: metric must be a symmetric positive definite operator of shape "
                    f"({n}, {n}) over the parameters, got shape {tuple(metric.shape)}"
                    f"{'' if metric.is_symmetric else ' (not symmetric)'}."
                )
            if metric.dtype != params_list[0].dtype:
                raise TypeError(f"GNSNewton: metric dtype {metric.dtype} != parameter dtype {params_list[0].dtype}.")
        self.model = model
        self.loss_fn = loss_fn
        self.curvature = curvature
        self.curvature_kwargs = dict(curvature_kwargs or {})
        self.metric = metric

    def _check_param_group(self, group: dict) -> None:
        check_lr(group["lr"], allow_zero=False)
        fp.check_positive("gamma0", group["gamma0"])
        fp.check_positive("gamma_min", group["gamma_min"])
        fp.check_positive("gamma_max", group["gamma_max"])
        if group["gamma_min"] > group["gamma_max"]:
            raise ValueError(f"Invalid gamma bounds: gamma_min={group['gamma_min']} > gamma_max={group['gamma_max']}.")
        fp.check_int_at_least("max_tries", group["max_tries"], 1)
        fp.check_positive("cg_tol", group["cg_tol"])
        fp.check_int_at_least("cg_maxiter", group["cg_maxiter"], 1)

    # ----------------------------------------------------------------- state
    def _global_state(self, params: list[Tensor]) -> dict:
        state = self.state[params[0]]
        if "step" not in state:
            state["step"] = 0
            state["num_params"] = sum(p.numel() for p in params)
            state["gamma"] = float(self.param_groups[0]["gamma0"])
            state["info"] = {}
        return state

    @property
    def gamma(self) -> float:
        """The current ``γ`` (the first try of the next step uses it)."""
        return self._global_state(fp.check_params(self))["gamma"]

    @property
    def info(self) -> dict:
        """Diagnostics of the last step: ``loss``, ``grad_norm`` (dual), ``gamma`` (of the
        accepted try), ``lam``, ``tries``, ``trial_loss``, ``trial_grad_norm`` (dual),
        ``cg_iterations`` (Lanczos iterations = curvature products of the step),
        ``cg_residual`` (relative residual of the accepted try's solve), ``accepted``,
        ``next_gamma``."""
        return dict(self._global_state(fp.check_params(self))["info"])

    def _dual_norm(self, v: Tensor) -> float:
        if self.metric is None:
            return float(torch.linalg.vector_norm(v))
        w = self.metric.solve(v, method="auto")
        return math.sqrt(max(float(v @ w), 0.0))

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, batch: Any = None, curvature_batch: Any = None):
        """One gradient-regularized Newton step with the adaptive search over ``γ``.

        Args:
            closure: zeroes grads, computes the loss on the batch, calls ``backward()``,
                returns the loss (optional with ``model``, ``loss_fn`` and ``batch``).
            batch: the batch for the curvature (and the default closure).
            curvature_batch: optionally a different (smaller) batch for the curvature only.

        Returns:
            The loss at the starting point, as returned by the closure.

        Raises:
            FloatingPointError: non-finite loss or gradient at the current point.
        """
        name = type(self).__name__
        params = fp.check_params(self)
        group = self.param_groups[0]
        state = self._global_state(params)
        closure, _, loss, f0, g = fp.start_step(self, closure, batch, self.model, self.loss_fn)
        state["step"] += 1
        gamma = state["gamma"]
        g_norm = self._dual_norm(g)
        info: dict[str, Any] = dict(
            loss=f0, grad_norm=g_norm, gamma=gamma, lam=float("nan"), tries=0,
            trial_loss=float("nan"), trial_grad_norm=float("nan"), cg_iterations=0, accepted=False,
        )
        if g_norm == 0.0:
            info["next_gamma"] = gamma
            state["info"] = info
            return loss

        theta = fp.gather_flat(params)
        cbatch = batch if curvature_batch is None else curvature_batch
        with torch.enable_grad():
            op = fp.build_curvature(
                self.curvature, params, cbatch, model=self.model, loss_fn=self.loss_fn,
                curvature_kwargs=self.curvature_kwargs, seed=group["seed"] + state["step"], name=name,
            )
            # One Krylov basis for every try: all products happen before any trial point.
            krylov = self._krylov(op, g, g_norm, g_norm / gamma, group["cg_tol"], group["cg_maxiter"])
        info["cg_iterations"] = krylov.num_iterations if krylov is not None else 0
        accepted = False
        for tries in range(1, group["max_tries"] + 1):
            lam = g_norm / gamma
            info.update(tries=tries, gamma=gamma, lam=lam)
            d = None if krylov is None else krylov.solve(lam)
            if d is not None:
                info["cg_residual"] = krylov.last_residual
                fp.set_flat_(params, theta + lr_value(group["lr"]) * d)
                try:
                    _, f1 = fp.evaluate_closure(closure, name)
                except BaseException:
                    fp.set_flat_(params, theta)  # an error in the closure leaves θ as it was
                    raise
                g1 = fp.gather_flat_grad(params)
                g1_norm = self._dual_norm(g1) if bool(torch.isfinite(g1).all()) else float("nan")
                info.update(trial_loss=f1, trial_grad_norm=g1_norm)
                accepted = _accept(f0, f1, g_norm, g1_norm, lam, g.dtype)
                if not accepted:
                    fp.set_flat_(params, theta)
            if accepted:
                gamma = min(2.0 * gamma, group["gamma_max"])
                break
            gamma = max(gamma / 2.0, group["gamma_min"])
        fp.set_flat_grad_(params, g)
        info["accepted"] = accepted
        info["next_gamma"] = gamma
        state["gamma"] = gamma
        state["info"] = info
        return loss

    def _krylov(self, op: LinearOperator, g: Tensor, g_norm: float, lam0: float, tol: float, maxiter: int):
        """Lanczos basis of ``B⁻¹C`` from ``B⁻¹g``, run until the shifted system for ``lam0``
        is solved to ``tol``; ``None`` if a product is not finite."""
        try:
            return _ShiftedKrylov(op, self.metric, g, g_norm, lam0, tol, maxiter)
        except FloatingPointError:
            return None


class _ShiftedKrylov:
    """Solutions of ``(C + λB) d = -g`` for many shifts ``λ`` from one Lanczos run.

    The Krylov space of ``B⁻¹C`` does not depend on the shift, so with a ``B``-orthonormal
    basis ``Q`` (``QᵀBQ = I``, ``QᵀCQ = T`` tridiagonal, ``q₁ = B⁻¹g/||g||_*``) the Galerkin
    solution for any ``λ`` is ``d = -||g||_* Q (T + λI)⁻¹ e₁``: in exact arithmetic the CG
    iterate for that shift (CG is Lanczos plus a factorization of ``T``).  Its residual
    in the dual norm is ``β_k |y_k|``.  The basis is fully re-orthogonalized (``k <=
    maxiter`` vectors are kept: memory ``k·n``, twice that with a metric), so the solution
    stays as accurate as CG's.  Products: one ``C`` product per iteration (plus one metric
    solve and product with a metric); none for additional shifts.  The residual shrinks
    as ``λ`` grows, so a basis that solves the first try's shift serves the later tries
    (the search only increases ``λ`` within a step).
    """

    def __init__(self, op, metric, g, g_norm, lam0, tol, maxiter):
        binv = (lambda v: v) if metric is None else (lambda v: metric.solve(v, method="auto"))
        bmul = (lambda v: v) if metric is None else (lambda v: metric @ v)
        self.g_norm = g_norm
        q = binv(g) / g_norm
        Bq = g / g_norm
        Q, BQ, alphas, betas = [], [], [], []
        q_prev, beta_prev = None, 0.0
        for _ in range(maxiter):
            Cq = op @ q
            alpha = float(Cq @ q)
            w = binv(Cq) - alpha * q
            if q_prev is not None:
                w = w - beta_prev * q_prev
            Q.append(q)
            BQ.append(Bq)
            alphas.append(alpha)
            Qm, BQm = torch.stack(Q, 1), torch.stack(BQ, 1)
            for _ in range(2):  # "twice is enough" (Kahan-Parlett)
                w = w - Qm @ (BQm.T @ w)
            Bw = bmul(w)
            beta = math.sqrt(max(float(w @ Bw), 0.0))
            if not math.isfinite(alpha) or not math.isfinite(beta):
                raise FloatingPointError("non-finite Lanczos coefficient")
            self._alphas, self._betas = alphas, betas
            y = self._coefficients(lam0)
            scale = max(abs(a) for a in alphas) + lam0
            if beta <= 1e-12 * scale or beta * abs(float(y[-1])) <= tol * g_norm:
                break
            betas.append(beta)
            q_prev, beta_prev = q, beta
            q, Bq = w / beta, Bw / beta
        self._Q = torch.stack(Q, 1)
        self._last_beta = beta
        self.num_iterations = len(alphas)
        self.last_residual = float("nan")

    def _coefficients(self, lam: float) -> Tensor:
        k = len(self._alphas)
        T = torch.diag(torch.tensor(self._alphas, dtype=torch.float64) + lam)
        if k > 1:
            off = torch.tensor(self._betas[: k - 1], dtype=torch.float64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        e1 = torch.zeros(k, dtype=torch.float64)
        e1[0] = -self.g_norm
        try:
            return torch.linalg.solve(T, e1)
        except RuntimeError:  # singular T + λI (indefinite curvature): no solution for this shift
            return torch.full_like(e1, float("nan"))

    def solve(self, lam: float) -> Tensor | None:
        """``d ≈ -(C + λB)⁻¹ g`` (``None`` if not finite); sets ``last_residual`` (relative, dual norm)."""
        y = self._coefficients(lam)
        if not bool(torch.isfinite(y).all()):
            return None
        self.last_residual = self._last_beta * abs(float(y[-1])) / self.g_norm
        d = self._Q @ y.to(dtype=self._Q.dtype, device=self._Q.device)
        return d if bool(torch.isfinite(d).all()) else None
