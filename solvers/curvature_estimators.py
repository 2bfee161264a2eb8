"""Stochastic diagonal curvature estimators (Hutchinson, Gauss-Newton-Bartlett) for Sophia.

Both estimators return one unbiased sample of a curvature diagonal over a list of
parameters, as a :class:`curvature.DiagonalOperator` (flat ``[n]``, ``param_shapes``
set) from :meth:`estimate`, or as parameter-shaped tensors from
:meth:`estimate_tensors` (what :class:`solvers.Sophia` consumes).  Any solver that
wants a cheap diagonal preconditioner can use them.

* :class:`HutchinsonEstimator`: ``h = u * (H u)`` with a Rademacher (default) or
  Gaussian probe ``u``; ``E[h] = diag(H)`` for the Hessian ``H`` of the loss.  One
  Hessian-vector product (double backward) per probe.  Can be negative.
* :class:`GNBEstimator`: Gauss-Newton-Bartlett.  Labels are *sampled* from the
  model's predictive distribution, ``g`` is the gradient of the **mean** loss to
  those labels over the ``N`` loss terms of the batch (rows of the logits, i.e.
  tokens for a language model), and ``h = N * g * g``.  Because sampled-label
  per-example gradients have zero mean, ``E[h] = diag(G)`` where ``G`` is the
  generalized Gauss-Newton matrix of the mean loss.  One forward and one backward,
  always ``>= 0``.  With the *data* labels the same formula gives the square of the
  mean gradient (empirical-Fisher-like), which is not a curvature estimate.

Randomness comes only from the estimator's own ``torch.Generator`` (``seed=`` or
``generator=``), so an estimate is reproducible and its state can be saved
(:meth:`get_rng_state` / :meth:`set_rng_state`; :class:`solvers.Sophia` stores it in
its ``state_dict``).

Data parallel (``process_group=``, as for the operators of :mod:`curvature.distributed`):
every rank passes its own shard of the batch and receives the same estimate, so Sophia
takes identical steps on every rank of a ``DistributedDataParallel`` job.  The estimate
follows DDP's own convention for the gradient: the mean over ranks of each rank's mean
loss (the whole batch's mean loss when the shards have equal sizes, as with a
``DistributedSampler``).  Hutchinson probes are the same on every rank (drawn from the
same seed), so ``u * mean_r(H_r u) = u * (H u)``: one ``all_reduce`` of the estimate.  GNB
samples each rank's labels from its own stream (derived from ``(seed, rank)`` with
``numpy.random.SeedSequence``), all-reduces the sampled-label gradient once and scales
its square by the token count of all ranks, ``N = sum_r N_r``.  A DDP-wrapped model is
used through its inner module (no DDP hooks run); a DDP model without
``process_group=`` is refused, as by the operators.  A rank that raises makes every rank
raise (the error flag travels in the same ``all_reduce``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvature import DiagonalOperator, LinearOperator, flatten
from curvature.distributed import ShardGroup, resolve_group, unwrap_model

__all__ = [
    "DiagonalCurvatureEstimator",
    "HutchinsonEstimator",
    "GNBEstimator",
    "rademacher",
    "rank_seed",
]


def rademacher(shape: Sequence[int], *, generator: torch.Generator, dtype: torch.dtype,
               device: torch.device | str) -> Tensor:
    """I.i.d. +-1 entries with probability 1/2 each, drawn from ``generator``."""
    r = torch.randint(0, 2, tuple(shape), generator=generator, device=device, dtype=torch.int8)
    return (r * 2 - 1).to(dtype)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own stream for base seed ``seed`` (``seed`` itself on rank 0).

    Independent streams per rank via ``numpy.random.SeedSequence([seed, rank])`` (what
    GNB's label sampling uses under ``process_group=``).
    """
    if rank == 0:
        return int(seed)
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _double_backward_kernels(model: nn.Module | None):
    """Context for a forward pass that will be differentiated twice (Hutchinson's HVPs).

    :func:`curvature.kernels.derivative_kernels`: math attention, no fused fast paths,
    unfused weight norm (a loss closure that builds its own forward gets it only when the
    estimator knows the model).
    """
    from curvature.kernels import derivative_kernels

    return contextlib.nullcontext() if model is None else derivative_kernels(model)


def _as_param_list(params_or_model) -> list[Tensor]:
    if isinstance(params_or_model, nn.Module):
        params = [p for p in params_or_model.parameters() if p.requires_grad]
    else:
        params = [p for p in params_or_model]
    if not params:
        raise ValueError("The estimator needs at least one trainable parameter (requires_grad=True).")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor) or not p.is_floating_point():
            raise TypeError(f"Parameter {i} is not a floating-point tensor.")
    return params


class DiagonalCurvatureEstimator:
    """Base class: a seeded, one-sample estimator of a curvature diagonal.

    Subclasses implement :meth:`estimate_tensors`.  ``params`` is the list the
    estimate is over (order = flat order of :meth:`estimate`).
    """

    def __init__(self, params: Sequence[Tensor], *, seed: int | None = None,
                 generator: torch.Generator | None = None, shards: ShardGroup | None = None,
                 per_rank_stream: bool = False) -> None:
        self.params = list(params)
        self.device = self.params[0].device
        #: the data-parallel group (``None``: this process's data only)
        self.shards = shards
        if generator is not None and seed is not None:
            raise ValueError("Pass either seed= or generator=, not both.")
        if generator is None:
            generator = torch.Generator(device=self.device)
            seed = int(seed) if seed is not None else 0
            if per_rank_stream and shards is not None:
                seed = rank_seed(seed, shards.rank)
            generator.manual_seed(seed)
        elif torch.device(generator.device).type != self.device.type:
            raise ValueError(f"generator lives on {generator.device} but the parameters on {self.device}.")
        self.generator = generator
        self.num_estimates = 0

    # ------------------------------------------------------------ randomness
    def get_rng_state(self) -> Tensor:
        """The generator state (a CPU ``uint8`` tensor)."""
        return self.generator.get_state()

    def set_rng_state(self, state: Tensor) -> None:
        """Restore a state from :meth:`get_rng_state`."""
        self.generator.set_state(state.cpu() if isinstance(state, Tensor) else torch.as_tensor(state))

    # -------------------------------------------------------------- interface
    def estimate_tensors(self, data) -> list[Tensor]:  # pragma: no cover - abstract
        """One estimate, as tensors shaped like ``params`` (detached)."""
        raise NotImplementedError

    def estimate(self, data) -> DiagonalOperator:
        """One estimate as a ``DiagonalOperator`` over the flattened parameters."""
        tensors = self.estimate_tensors(data)
        shapes = [p.shape for p in self.params]
        return DiagonalOperator(flatten(tensors, shapes), param_shapes=shapes)

    __call__ = estimate

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.params)
        return f"{type(self).__name__}(num_params={n}, device={self.device})"


def _data_parallel(model: nn.Module | None, process_group) -> tuple[nn.Module | None, ShardGroup | None]:
    """``(the module to call, ShardGroup or None)`` for an estimator (see the module docstring)."""
    group = resolve_group(process_group, model)
    inner = unwrap_model(model) if model is not None else None
    return inner, (ShardGroup(group) if group is not None else None)


class HutchinsonEstimator(DiagonalCurvatureEstimator):
    """Hutchinson diagonal: ``h = mean_j u_j * (H u_j)`` with ``E[h] = diag(H)``.

    Args:
        model_or_params: an ``nn.Module`` (its trainable parameters) or a list of
            tensors.
        loss_fn: ``loss_fn(model(X), y) -> scalar``; needed only when the data is a
            batch ``(X, y)`` (then ``model_or_params`` must be the module).
        distribution: ``"rademacher"`` (default, variance ``sum_{j!=i} H_ij^2``) or
            ``"gaussian"`` (adds ``2 H_ii^2``).
        num_probes: probes averaged per estimate (one HVP each, one shared graph).
        seed, generator: the source of the probes.

    ``data`` for :meth:`estimate` is a callable returning the scalar loss (built with
    autograd enabled, *without* calling ``backward``), a batch ``(X, y)``, or a
    symmetric ``curvature.LinearOperator`` over the flattened parameters (then
    ``h = u * (A u)``: works for any operator, e.g. a GGN).

    Cost: one gradient with ``create_graph=True`` plus ``num_probes`` double-backward
    passes (about 2-3 gradients each).  After a call on a loss, :attr:`last_loss`
    and :attr:`last_grads` hold the loss and its gradient (free by-products).
    """

    def __init__(self, model_or_params, loss_fn: Callable | None = None, *,
                 distribution: str = "rademacher", num_probes: int = 1,
                 seed: int | None = None, generator: torch.Generator | None = None,
                 process_group=None) -> None:
        if distribution not in ("rademacher", "gaussian"):
            raise ValueError(f"Unknown probe distribution {distribution!r}; use 'rademacher' or 'gaussian'.")
        if int(num_probes) < 1:
            raise ValueError(f"num_probes must be >= 1, got {num_probes}.")
        model = model_or_params if isinstance(model_or_params, nn.Module) else None
        self.model, shards = _data_parallel(model, process_group)
        super().__init__(_as_param_list(model_or_params), seed=seed, generator=generator, shards=shards)
        self.loss_fn = loss_fn
        self.distribution = distribution
        self.num_probes = int(num_probes)
        self.last_loss: Tensor | None = None
        self.last_grads: list[Tensor] | None = None

    def _probe(self, p: Tensor) -> Tensor:
        if self.distribution == "rademacher":
            return rademacher(p.shape, generator=self.generator, dtype=p.dtype, device=p.device)
        return torch.randn(p.shape, generator=self.generator, dtype=p.dtype, device=p.device)

    def _loss(self, data) -> Tensor:
        if callable(data):
            loss = data()
        elif isinstance(data, Mapping) or (isinstance(data, (tuple, list)) and len(data) >= 2):
            if self.model is None or self.loss_fn is None:
                raise ValueError("A batch (X, y) needs HutchinsonEstimator(model, loss_fn); "
                                 "otherwise pass a closure returning the loss.")
            from ._flat_params import batch_loss

            loss = batch_loss(self.model, self.loss_fn, data)
        else:
            raise TypeError("Hutchinson data must be a loss closure, a batch (X, y) or a LinearOperator, "
                            f"got {type(data).__name__}.")
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("The loss must be a scalar tensor, got "
                             f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}.")
        return loss.reshape(())

    def estimate_tensors(self, data) -> list[Tensor]:
        """One Hutchinson estimate, shaped like the parameters (see class doc for ``data``).

        With ``process_group=``: the mean over ranks of the ranks' estimates (the probes
        are the same on every rank), and :attr:`last_loss` / :attr:`last_grads` are the
        means over ranks too; one ``all_reduce`` per dtype of the parameters.
        """
        if isinstance(data, LinearOperator):
            return self._estimate_operator(data)
        if self.shards is None:
            acc, grads, loss = self._local_estimate(data)
        else:
            acc = [torch.zeros_like(p) for p in self.params]
            grads = [torch.zeros_like(p) for p in self.params]
            loss = torch.zeros((), dtype=self.params[0].dtype, device=self.device)
            with self.shards.summed([*acc, *grads, loss]):
                a, g, l = self._local_estimate(data)
                torch._foreach_copy_(acc, a)
                torch._foreach_copy_(grads, g)
                loss.copy_(l)
            inv = 1.0 / self.shards.size
            torch._foreach_mul_(acc, inv)
            torch._foreach_mul_(grads, inv)
            loss.mul_(inv)
        self.last_loss, self.last_grads = loss, grads
        self.num_estimates += 1
        return acc

    def _local_estimate(self, data) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """``(estimate, gradient, loss)`` of this process's data, detached."""
        # KERNELS WIRING: the single place where Sophia-H differentiates twice through the model.
        with torch.enable_grad(), _double_backward_kernels(self.model):
            loss = self._loss(data)
            if not loss.requires_grad:
                raise ValueError("The loss does not depend on the parameters (no autograd graph).")
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            pairs = [(g, p) for g, p in zip(grads, self.params)]
            acc = [torch.zeros_like(p) for p in self.params]
            live = [i for i, (g, _) in enumerate(pairs) if g is not None and g.requires_grad]
            for j in range(self.num_probes):
                us = [self._probe(p) for p in self.params]
                if live:
                    hvs = torch.autograd.grad([grads[i] for i in live], [self.params[i] for i in live],
                                              grad_outputs=[us[i] for i in live],
                                              retain_graph=j < self.num_probes - 1, allow_unused=True)
                    for i, hv in zip(live, hvs):
                        if hv is not None:
                            acc[i].add_(us[i] * hv)
        if self.num_probes > 1:
            for a in acc:
                a.div_(self.num_probes)
        grads = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, self.params)]
        return acc, grads, loss.detach()

    def _estimate_operator(self, op: LinearOperator) -> list[Tensor]:
        n = sum(p.numel() for p in self.params)
        if op.shape != (n, n):
            raise ValueError(f"Dimension mismatch: operator of shape {op.shape} for {n} parameters.")
        acc = None
        for _ in range(self.num_probes):
            u = flatten([self._probe(p) for p in self.params])
            h = u * (op @ u)
            acc = h if acc is None else acc + h
        acc = acc / self.num_probes
        self.num_estimates += 1
        sizes = [p.numel() for p in self.params]
        return [a.view(p.shape).clone() for a, p in zip(torch.split(acc, sizes), self.params)]


class GNBEstimator(DiagonalCurvatureEstimator):
    """Gauss-Newton-Bartlett diagonal: ``h = N * g * g`` with sampled labels; ``E[h] = diag(GGN)``.

    Args:
        model: the ``nn.Module``; ``model(X)`` must return outputs of shape ``[..., C]``
            (logits for ``"ce"``, predictions for ``"mse"``); all leading dimensions
            are loss terms, ``N = outputs.numel() // C`` (tokens for a language model).
        loss: ``"ce"`` for ``F.cross_entropy(logits, y)`` (mean over the N rows), or
            ``"mse"`` for ``F.mse_loss(out, y)`` (mean over all ``N * C`` entries,
            PyTorch's default).  Labels are drawn from the matching predictive
            distribution: ``Categorical(softmax(z))``, resp. ``N(z, (C/2) I)`` (the
            Gaussian whose negative log-likelihood is the per-row MSE, so its Fisher
            equals the GGN of the MSE: output Hessian ``(2/C) I``).
        params: the parameters to estimate over (default: trainable parameters of
            ``model``).
        output_fn: optional map from ``model(X)`` to the outputs (e.g. ``lambda o: o[0]``
            for models returning ``(logits, loss)``).
        max_grad_norm: clip the sampled-label gradient to this global norm before
            squaring, as the official training script does (default: no clipping).
        seed, generator: the source of the sampled labels.  With ``process_group=``
            each rank draws from its own stream, derived from ``(seed, rank)``; a
            ``generator=`` is used as given (make it differ across ranks yourself).
        process_group: data parallel (see the module docstring): ``g`` is the mean over
            ranks of each rank's sampled-label gradient (DDP's convention) and ``N`` the
            rows of all ranks.  The official SophiaG script under DDP multiplies by one
            rank's token count instead (``bs = batch_size * block_size``), so its ``h``
            is ours divided by the world size ``W``: its ``rho`` equals our ``rho / W``.

    ``data`` for :meth:`estimate` is the model input ``X``, a batch ``(X, y)`` (``y``
    unused: labels are sampled), or a callable returning the outputs.

    Cost: one forward and one backward of the mean loss.  ``model`` is used in its
    current mode (train/eval) and left unchanged; ``.grad`` fields are not touched.
    """

    def __init__(self, model: nn.Module, loss: str = "ce", *, params: Iterable[Tensor] | None = None,
                 output_fn: Callable[[object], Tensor] | None = None, max_grad_norm: float | None = None,
                 seed: int | None = None, generator: torch.Generator | None = None,
                 process_group=None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"GNBEstimator needs an nn.Module, got {type(model).__name__}.")
        if loss not in ("ce", "mse"):
            raise ValueError(f"Unknown loss {loss!r}; GNB supports 'ce' (cross-entropy) and 'mse'.")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}.")
        inner, shards = _data_parallel(model, process_group)
        super().__init__(_as_param_list(model if params is None else params), seed=seed, generator=generator,
                         shards=shards, per_rank_stream=True)
        self.model = inner
        self.loss = loss
        self.output_fn = output_fn
        self.max_grad_norm = max_grad_norm

    def _outputs(self, data) -> Tensor:
        if callable(data) and not isinstance(data, nn.Module):
            out = data()
        else:
            X = data[0] if isinstance(data, (tuple, list)) and len(data) == 2 else data
            out = self.model(X)
        if self.output_fn is not None:
            out = self.output_fn(out)
        if not isinstance(out, Tensor) or out.dim() < 1 or out.numel() == 0:
            raise ValueError("GNB needs model outputs of shape [..., C], got "
                             f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}.")
        return out

    def sampled_loss(self, data) -> tuple[Tensor, int]:
        """The mean loss to labels sampled from the model, and ``N`` (rows)."""
        out = self._outputs(data)
        C = out.shape[-1]
        z = out.reshape(-1, C)
        N = z.shape[0]
        with torch.no_grad():
            if self.loss == "ce":
                # inverse-CDF sampling (one uniform per row; ~10x cheaper than torch.multinomial)
                cdf = torch.softmax(z.detach().float(), dim=-1).cumsum_(-1)
                u = torch.rand(N, 1, generator=self.generator, dtype=cdf.dtype, device=cdf.device)
                y = (cdf < u).sum(-1).clamp_(max=C - 1)
            else:
                noise = torch.randn(z.shape, generator=self.generator, dtype=z.dtype, device=z.device)
                y = z.detach() + math.sqrt(C / 2.0) * noise
        loss = F.cross_entropy(z, y) if self.loss == "ce" else F.mse_loss(z, y)
        return loss, N

    def estimate_tensors(self, data) -> list[Tensor]:
        """One GNB estimate ``N * g * g``, shaped like the parameters.

        With ``process_group=``: ``g`` and ``N`` over all ranks (one ``all_reduce`` of the
        gradient, one of ``N``), identical on every rank.
        """
        if self.shards is None:
            grads, N = self._local_gradient(data)
        else:
            grads = [torch.zeros_like(p) for p in self.params]
            count = torch.zeros(1, dtype=torch.float64, device=self.device)
            with self.shards.summed([*grads, count]):
                local, n = self._local_gradient(data)
                torch._foreach_copy_(grads, local)
                count.fill_(n)
            torch._foreach_mul_(grads, 1.0 / self.shards.size)
            N = count.reshape(())  # a tensor: no host read
        if self.max_grad_norm is not None:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            factor = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
            torch._foreach_mul_(grads, factor)
        out = torch._foreach_mul(grads, grads)
        if isinstance(N, Tensor):
            torch._foreach_mul_(out, N.to(out[0].dtype))
        else:
            torch._foreach_mul_(out, float(N))
        self.num_estimates += 1
        return out

    def _local_gradient(self, data) -> tuple[list[Tensor], int]:
        """The sampled-label gradient of this process's mean loss, and its row count ``N``."""
        with torch.enable_grad():
            loss, N = self.sampled_loss(data)
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)], N
