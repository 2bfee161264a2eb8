"""Sophia: second-order clipped stochastic optimization (Liu, Li, Hall, Liang, Ma 2023).

A ``torch.optim.Optimizer`` with a pluggable diagonal curvature estimator
(:class:`~solvers.curvature_estimators.GNBEstimator` for Sophia-G,
:class:`~solvers.curvature_estimators.HutchinsonEstimator` for Sophia-H, or any
diagonal you supply), refreshed every ``update_interval`` steps by the optimizer
itself.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.optim import Optimizer

from curvature import DiagonalOperator, unflatten

from .curvature_estimators import DiagonalCurvatureEstimator

__all__ = ["Sophia"]


class Sophia(Optimizer):
    r"""Sophia with per-coordinate clipping, decoupled weight decay and a lazy curvature EMA.

    Every step ``t`` (1-based), per coordinate, with ``g`` the current ``.grad``::

        theta <- theta * (1 - lr * weight_decay)                       (decoupled decay)
        m     <- beta1 * m + (1 - beta1) * g                           (no bias correction)
        theta <- theta - lr * clip(m / max(gamma * h, eps), -1, 1)

    and after steps ``k, 2k, 3k, ...`` (``k = update_interval``) the curvature is
    refreshed from an estimate ``h_hat`` at the *new* parameters::

        h <- beta2 * h + (1 - beta2) * h_hat        (h starts at 0, no bias correction)

    so the first ``k`` steps, before any curvature, are sign-momentum steps of size
    ``lr``, and every coordinate of every step moves by at most ``lr`` (plus the
    decay).  ``h_hat`` is an unbiased diagonal estimate *of the mean loss*; the GNB
    estimator already includes the batch factor (``h_hat = N * g_hat**2``).

    Mapping of hyperparameters (ours = official SophiaG code = paper, Algorithm 3):

    * ``lr`` = official ``lr`` = paper ``eta_t``;
    * ``gamma`` (alias ``rho``) = official ``rho`` = paper ``gamma``;
    * our ``h`` = official ``bs * h`` (official ``update_hessian`` stores ``g*g`` and
      multiplies by ``bs`` = tokens per step at use time; our GNB multiplies by the
      number of loss terms N when it estimates), i.e. official
      ``min(|m| / (rho * bs * h_off + 1e-15), 1) = min(|m| / (gamma * h), 1)`` here,
      up to the additive ``1e-15`` which we replace by the paper's ``max(., eps)``
      (needed for Hutchinson estimates, which can be negative);
    * ``eps`` = paper ``epsilon`` (official: ``1e-15`` added);
    * paper v1 form ``eta * clip(m / max(h, eps), rho_v1)`` = ours with
      ``lr = eta * rho_v1`` and ``gamma = rho_v1``.

    Args:
        params: parameters or param groups.
        lr: step size (``>= 0``), the largest move of a coordinate per step.
        betas: ``(beta1, beta2)`` for the gradient and curvature EMAs.
        rho: the clipping scale ``gamma`` (``> 0``); ``gamma=`` is an alias.  Larger
            values clip less often (higher win rate).  Paper defaults: 0.05 for
            GNB, 0.01 for Hutchinson (levanter).
        weight_decay: decoupled weight decay (``>= 0``).
        eps: floor of the denominator ``max(gamma * h, eps)`` (``> 0``).
        estimator: a :class:`DiagonalCurvatureEstimator` over (a superset of) the
            parameters, or ``None`` to feed curvature yourself through
            :meth:`update_curvature`.
        update_interval: ``k``; refresh inside :meth:`step` after every ``k``-th
            step (``None``/``0``: never refresh automatically).
        foreach: use the multi-tensor ``torch._foreach_*`` path (default ``True``)
            or the single-tensor reference loop.
        nonfinite: ``"raise"`` (default) raises ``FloatingPointError`` when a
            gradient is NaN/inf, before anything is written; ``"skip"`` skips that
            step with a warning (counted in ``num_skipped_steps``).  Non-finite
            curvature estimates are always rejected the same way.

    Attributes:
        last_win_rate: fraction of coordinates (all groups) *not* clipped at the
            last step, ``|m| < gamma * h`` (the official code's "win rate"; healthy
            runs sit in 0.1-0.5).  ``last_win_rates``: the same per group.
        num_steps, num_curvature_updates, num_skipped_steps: counters (saved in the
            ``state_dict``, together with the estimator's RNG state, so a restored
            optimizer continues bit-identically).

    Example::

        est = GNBEstimator(model, loss="ce", seed=0)
        opt = Sophia(model.parameters(), lr=3e-4, rho=0.05, estimator=est, update_interval=10)
        for X, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(X).flatten(0, -2), y.flatten()).backward()
            opt.step(curvature_input=X)   # refreshes h itself every 10 steps

    Cost per step: a few elementwise passes over the parameters (like AdamW); every
    ``k`` steps one estimator call (GNB: one forward + backward; Hutchinson: one
    gradient with graph + one HVP per probe).  Memory: two buffers per parameter.
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.04, weight_decay: float = 1e-1, *, eps: float = 1e-15,
                 gamma: float | None = None, estimator: DiagonalCurvatureEstimator | None = None,
                 update_interval: int | None = 10, foreach: bool = True, nonfinite: str = "raise") -> None:
        if gamma is not None:
            rho = gamma
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"Invalid learning rate: {lr} (must be >= 0).")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta1: {betas[0]} (must be in [0, 1)).")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta2: {betas[1]} (must be in [0, 1)).")
        if not rho > 0:
            raise ValueError(f"Invalid rho/gamma: {rho} (must be > 0).")
        if not weight_decay >= 0:
            raise ValueError(f"Invalid weight_decay: {weight_decay} (must be >= 0).")
        if not eps > 0:
            raise ValueError(f"Invalid eps: {eps} (must be > 0).")
        if update_interval is not None and int(update_interval) < 0:
            raise ValueError(f"Invalid update_interval: {update_interval} (must be >= 0 or None).")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}.")
        if estimator is not None and not isinstance(estimator, DiagonalCurvatureEstimator):
            raise TypeError(f"estimator must be a DiagonalCurvatureEstimator, got {type(estimator).__name__}.")
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, eps=eps)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.is_complex() or p.is_sparse:
                    raise ValueError("Sophia supports dense real parameters only.")
        self.estimator = estimator
        self.update_interval = int(update_interval) if update_interval else 0
        self.foreach = bool(foreach)
        self.nonfinite = nonfinite
        self.num_steps = 0
        self.num_curvature_updates = 0
        self.num_skipped_steps = 0
        self._win: dict[int, tuple] = {}  # group index -> (not-clipped count, total)

    # ---------------------------------------------------------------- state
    def _state_for(self, p: Tensor) -> dict:
        st = self.state[p]
        if len(st) == 0:
            st["step"] = torch.tensor(0.0)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["sophia"] = {
            "num_steps": self.num_steps,
            "num_curvature_updates": self.num_curvature_updates,
            "num_skipped_steps": self.num_skipped_steps,
            "estimator_rng_state": None if self.estimator is None else self.estimator.get_rng_state().clone(),
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("sophia", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self.num_steps = int(extra["num_steps"])
            self.num_curvature_updates = int(extra["num_curvature_updates"])
            self.num_skipped_steps = int(extra["num_skipped_steps"])
            rng = extra.get("estimator_rng_state")
            if rng is not None and self.estimator is not None:
                self.estimator.set_rng_state(rng)

    # ------------------------------------------------------------ win rate
    @property
    def last_win_rates(self) -> list[float]:
        """Per group: fraction of coordinates not clipped at the last step (nan before any step)."""
        out = []
        for gi in range(len(self.param_groups)):
            w = self._win.get(gi)
            out.append(float("nan") if w is None else float(w[0]) / max(float(w[1]), 1.0))
        return out

    @property
    def last_win_rate(self) -> float:
        """Fraction of all coordinates not clipped at the last step (nan before any step)."""
        ws = list(self._win.values())
        if not ws:
            return float("nan")
        return float(sum(float(w[0]) for w in ws)) / max(sum(float(w[1]) for w in ws), 1.0)

    # ------------------------------------------------------------ curvature
    def needs_curvature(self) -> bool:
        """Whether the *next* :meth:`step` will refresh the curvature."""
        k = self.update_interval
        return bool(k) and self.estimator is not None and (self.num_steps + 1) % k == 0

    @torch.no_grad()
    def update_curvature(self, curvature=None) -> None:
        """EMA-update ``h`` with one diagonal estimate.

        Args:
            curvature: a ``DiagonalOperator`` over the flattened parameters (all
                groups, in order), a list of parameter-shaped tensors, or the input
                of the estimator (a batch, model input or closure; see the
                estimator).  ``None`` is not allowed.

        Raises:
            FloatingPointError: the estimate has NaN/inf entries (nothing changed).
        """
        params = [p for g in self.param_groups for p in g["params"]]
        if curvature is None:
            raise ValueError("update_curvature needs a diagonal estimate or the estimator's input "
                             "(a batch (X, y), the model input, or a closure).")
        if isinstance(curvature, DiagonalOperator):
            diag = unflatten(curvature.diag, [p.shape for p in params])
        elif isinstance(curvature, (list, tuple)) and len(curvature) == len(params) and all(
                isinstance(t, Tensor) and t.shape == p.shape for t, p in zip(curvature, params)):
            diag = list(curvature)
        else:
            if self.estimator is None:
                raise ValueError("No estimator: pass a DiagonalOperator or parameter-shaped tensors.")
            diag = self._estimate(curvature, params)
        if len(diag) != len(params):
            raise ValueError(f"Got {len(diag)} curvature tensors for {len(params)} parameters.")
        norms = torch._foreach_norm([d.detach() for d in diag])
        if not bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
            raise FloatingPointError("Sophia.update_curvature: the curvature estimate has NaN/inf entries; "
                                     "h was left unchanged.")
        i = 0
        for group in self.param_groups:
            beta2 = group["betas"][1]
            hs = []
            ds = []
            for p in group["params"]:
                hs.append(self._state_for(p)["hessian"])
                ds.append(diag[i].detach().to(dtype=p.dtype, device=p.device))
                i += 1
            if self.foreach:
                torch._foreach_mul_(hs, beta2)
                torch._foreach_add_(hs, ds, alpha=1 - beta2)
            else:
                for h, d in zip(hs, ds):
                    h.mul_(beta2).add_(d, alpha=1 - beta2)
        self.num_curvature_updates += 1

    def _estimate(self, data, params: list[Tensor]) -> list[Tensor]:
        est = self.estimator
        index = {id(q): j for j, q in enumerate(est.params)}
        missing = [j for j, p in enumerate(params) if id(p) not in index]
        if missing:
            raise ValueError(f"The estimator does not cover optimizer parameter(s) {missing}; build it over "
                             "the same model/parameters.")
        with torch.enable_grad():
            tensors = est.estimate_tensors(data)
        return [tensors[index[id(p)]] for p in params]

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None, *, curvature_input=None):
        """One Sophia step; refreshes the curvature after every ``update_interval``-th step.

        Args:
            closure: optional; re-evaluates the loss and calls ``backward`` (returned).
            curvature_input: what the estimator needs on refresh steps (a batch
                ``(X, y)``, the model input, or a closure; see the estimator).  For a
                Hutchinson estimator with ``loss_fn`` you may pass the batch; if it is
                missing on a refresh step a ``ValueError`` is raised (call
                :meth:`needs_curvature` to know in advance).

        Returns:
            The closure's loss, or ``None``.
        """
        if self.needs_curvature() and curvature_input is None:
            raise ValueError("This step refreshes the curvature: pass curvature_input= (a batch, the model "
                             "input or a closure for the estimator), or set update_interval=None.")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            for p in ps:
                if p.grad.is_sparse:
                    raise ValueError("Sophia does not support sparse gradients.")
            groups.append(ps)
        all_grads = [p.grad for ps in groups for p in ps]
        if all_grads:
            norms = torch._foreach_norm(all_grads)
            if not bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
                if self.nonfinite == "raise":
                    raise FloatingPointError("Sophia.step: a gradient has NaN/inf entries; parameters were "
                                             "not changed (pass nonfinite='skip' to skip such steps).")
                warnings.warn("Sophia.step: non-finite gradient, step skipped.", RuntimeWarning, stacklevel=2)
                self.num_skipped_steps += 1
                return loss
        for gi, (group, ps) in enumerate(zip(self.param_groups, groups)):
            if not ps:
                continue
            grads = [p.grad for p in ps]
            sts = [self._state_for(p) for p in ps]
            m = [s["exp_avg"] for s in sts]
            h = [s["hessian"] for s in sts]
            for s in sts:
                s["step"] += 1
            fn = _multi_tensor_sophia if self.foreach else _single_tensor_sophia
            self._win[gi] = fn(ps, grads, m, h, lr=group["lr"], beta1=group["betas"][0], gamma=group["rho"],
                               weight_decay=group["weight_decay"], eps=group["eps"])
        self.num_steps += 1
        k = self.update_interval
        if k and self.estimator is not None and self.num_steps % k == 0:
            self.update_curvature(curvature_input)
        return loss


def _single_tensor_sophia(params, grads, exp_avgs, hessians, *, lr, beta1, gamma, weight_decay, eps):
    """Reference loop; returns (not-clipped count, total); the count stays a tensor (no sync)."""
    count = None
    total = 0
    for p, g, m, h in zip(params, grads, exp_avgs, hessians):
        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        denom = (h * gamma).clamp_min_(eps)
        ratio = (m / denom).clamp_(-1.0, 1.0)
        c = ratio.abs().floor_().sum()  # clipped coordinates: |ratio| == 1
        count = c if count is None else count + c
        total += ratio.numel()
        p.add_(ratio, alpha=-lr)
    return total - count, total


def _multi_tensor_sophia(params, grads, exp_avgs, hessians, *, lr, beta1, gamma, weight_decay, eps):
    """``torch._foreach_*`` version of :func:`_single_tensor_sophia` (same operations)."""
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    denom = torch._foreach_mul(hessians, gamma)
    torch._foreach_clamp_min_(denom, eps)
    ratio = torch._foreach_div(exp_avgs, denom)
    torch._foreach_clamp_min_(ratio, -1.0)
    torch._foreach_clamp_max_(ratio, 1.0)
    clipped = torch._foreach_abs(ratio)
    torch._foreach_floor_(clipped)  # 1 where clipped (|ratio| == 1), else 0
    count = torch.stack(torch._foreach_norm(clipped, 1)).sum()
    total = sum(r.numel() for r in ratio)
    torch._foreach_add_(params, ratio, alpha=-lr)
    return total - count, total
