"""A PyHessian-compatible ``hessian`` class: switch with one import line.

::

    # from pyhessian import hessian                      # before
    from estimators.compat.pyhessian import hessian        # after

    hessian_comp = hessian(model, criterion, data=(inputs, targets), cuda=True)
    top_eigenvalues, top_eigenvectors = hessian_comp.eigenvalues(top_n=5)
    trace = np.mean(hessian_comp.trace())
    density_eigen, density_weight = hessian_comp.density()

Same constructor, method names, keyword arguments and result shapes and types as
PyHessian 0.1 (``pip install pyhessian``): ``eigenvalues()`` returns a list of Python
floats and a list of eigenvectors, each a list of tensors shaped like the trainable
parameters; ``trace()`` returns the list of per-probe Hutchinson samples
``v^T H v`` (take their mean); ``density()`` returns two lists with one list of nodes
and one list of weights per probe.  Underneath are this toolkit's
:class:`curvature.HessianOperator` and estimators, so the answers differ where
PyHessian 0.1 is wrong or unreproducible:

* **Largest algebraic eigenvalues.**  PyHessian runs deflated power iteration, which
  converges to the eigenvalues of largest *magnitude*: near a saddle its "top
  eigenvalue" can be a large negative one.  Here ``eigenvalues(top_n=k)`` returns the
  ``k`` largest *algebraic* eigenvalues (thick-restart Lanczos), in descending order.
  On a positive semi-definite Hessian (a convex model) the two agree.
* **Accuracy.**  ``tol`` is a relative residual tolerance, ``||H v - theta v|| <= tol
  |theta|``, which bounds the eigenvalue error by ``tol |theta|`` (and by ``tol^2
  theta^2 / gap`` with a gap to the rest of the spectrum).  PyHessian stops when two
  successive Rayleigh quotients differ by less than ``tol`` relative, which says
  little when power iteration is slow.  ``maxIter * top_n`` is the product budget
  (a :class:`curvature.ConvergenceWarning` if it runs out).
* **Reproducible.**  Every random draw comes from a ``torch.Generator`` seeded with
  ``seed`` (default 0; a keyword of the constructor and of each method), so the same
  call gives the same numbers.  PyHessian draws from the global RNG.
* **Trace stopping rule.**  Same rule as PyHessian (stop when the running mean changes
  by less than ``tol`` relative), with ``abs`` in the denominator: PyPI 0.1 divides by
  ``trace + 1e-6`` and so stops at the wrong time on negative traces.
* **Density.**  Lanczos with full reorthogonalization and a symmetric tridiagonal
  eigensolver (PyHessian 0.1 calls ``torch.eig``, removed from PyTorch, so its
  ``density()`` no longer runs); ``iter`` is capped at the number of parameters and a
  probe that reaches an invariant subspace stops early (its lists are then shorter).
  Nodes are returned in ascending order; weights of each probe sum to 1.
* **No side effects.**  The model is evaluated in eval mode (as PyHessian does) but its
  train/eval flags are restored; nothing is written into ``.grad``; no graph is kept
  between calls other than the operator's cached gradient graph for a single batch.
* **Device.**  Taken from the model when its parameters are already on an accelerator;
  otherwise ``cuda=True`` moves the model to CUDA (what PyHessian users do before
  constructing it) and falls back to the CPU with a warning when CUDA is unavailable.
  Batches are moved to the model's device.
* **Data loaders.**  With ``dataloader=`` the Hessian is that of the loss over the whole
  data set: for a mean-reduced loss the batch products are weighted by ``B_b / N``
  (PyHessian's weighting, right also for a ragged last batch); a sum-reduced loss gives
  the Hessian of the total (PyHessian would average it).

Why here and not ``curvature.compat``: the facade needs the estimators, and the
``curvature`` package must never import ``estimators`` (the dependency rule of the
toolkit), so it lives in ``estimators.compat``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor, nn

from curvature import HessianOperator, LinearOperator

from .._probes import make_generator, rademacher
from ..eigen import top_eigenvalues

__all__ = ["hessian"]


class hessian:  # noqa: N801 - the PyHessian name, so that switching takes one import line
    """PyHessian's ``hessian(model, criterion, data=None, dataloader=None, cuda=True)``.

    Args:
        model: the ``nn.Module``.
        criterion: the loss ``criterion(model(inputs), targets)`` (scalar).
        data: one batch ``(inputs, targets)``.
        dataloader: alternatively an iterable of batches (a DataLoader); exactly one of
            ``data`` and ``dataloader`` must be given.
        cuda: compute on CUDA (see the module docstring: the model's own device wins
            when it is already on an accelerator).
        seed: seed of every random draw (keyword-only, default 0).

    Attributes:
        model, criterion, data, full_dataset, device, params: as in PyHessian
            (``device`` is a string, ``params`` the trainable parameters).
        operator: the underlying :class:`curvature.HessianOperator` (products counted
            in ``operator.num_matvecs``).
        seed: the default seed of the methods.

    Raises:
        ValueError: neither or both of ``data``/``dataloader``; ``data`` not a pair.
        TypeError: ``model`` is not an ``nn.Module``.
    """

    def __init__(self, model: nn.Module, criterion, data=None, dataloader=None, cuda: bool = True,
                 *, seed: int = 0) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if data is None and dataloader is None:
            raise ValueError("hessian() needs data: pass data=(inputs, targets) or dataloader=.")
        if data is not None and dataloader is not None:
            raise ValueError("hessian() takes either data= (one batch) or dataloader=, not both.")
        if data is not None and not (isinstance(data, (tuple, list)) and len(data) == 2):
            raise ValueError(
                f"data must be one batch (inputs, targets), got {type(data).__name__}"
                f"{' of length %d' % len(data) if isinstance(data, (tuple, list)) else ''}; "
                "pass a loader as dataloader= instead."
            )
        self.model = model
        self.criterion = criterion
        self.full_dataset = data is None
        self.data = dataloader if self.full_dataset else tuple(data)
        self.seed = int(seed)
        self._place_model(model, cuda)
        self.operator: LinearOperator = HessianOperator(model, criterion, self.data)
        self.params = list(self.operator.params)
        self.device = str(self.operator.device)

    @staticmethod
    def _place_model(model: nn.Module, cuda: bool) -> None:
        try:
            p0 = next(p for p in model.parameters() if p.requires_grad)
        except StopIteration:
            raise ValueError("The model has no trainable parameters (all have requires_grad=False).") from None
        if p0.device.type != "cpu" or not cuda:
            return  # already placed (the model's device wins), or CPU asked for
        if torch.cuda.is_available():
            model.cuda()
        else:
            warnings.warn("hessian(cuda=True) but CUDA is not available: computing on the CPU.",
                          RuntimeWarning, stacklevel=3)

    def _seed(self, seed: int | None) -> int:
        return self.seed if seed is None else int(seed)

    # ------------------------------------------------------------------ eigenvalues
    def eigenvalues(self, maxIter: int = 100, tol: float = 1e-3, top_n: int = 1,  # noqa: N803
                    *, seed: int | None = None) -> tuple[list[float], list[list[Tensor]]]:
        """The ``top_n`` largest algebraic eigenvalues and their eigenvectors.

        Args:
            maxIter: products per eigenvalue (budget ``maxIter * top_n`` in total).
            tol: relative residual tolerance (bounds the relative eigenvalue error).
            top_n: number of eigenpairs.
            seed: overrides the instance seed for the start vector.

        Returns:
            ``(eigenvalues, eigenvectors)``: a list of ``top_n`` floats, descending, and
            a list of ``top_n`` unit eigenvectors, each a list of tensors shaped like
            ``self.params``.

        Raises:
            ValueError: ``top_n`` outside ``[1, n]``, non-positive ``maxIter`` or ``tol``.
        """
        top_n, max_iter = int(top_n), int(maxIter)
        if top_n < 1:
            raise ValueError(f"top_n must be >= 1, got {top_n}.")
        if max_iter < 1:
            raise ValueError(f"maxIter must be >= 1, got {maxIter}.")
        res = top_eigenvalues(self.operator, top_n, which="LA", tol=float(tol),
                              max_matvecs=max_iter * top_n, seed=self._seed(seed))
        values = [float(v) for v in res.eigenvalues]
        vectors = [[t.clone() for t in self.operator.unflatten(res.eigenvectors[:, j])]
                   for j in range(top_n)]
        return values, vectors

    # ------------------------------------------------------------------------ trace
    def trace(self, maxIter: int = 100, tol: float = 1e-3,  # noqa: N803
              *, seed: int | None = None, block_size: int = 8) -> list[float]:
        """Hutchinson samples ``v^T H v`` (Rademacher ``v``) until the mean settles.

        Stops after probe ``i`` when ``|mean_i - mean_{i-1}| / (|mean_{i-1}| + 1e-6) < tol``
        (``mean_0 = 0``), or after ``maxIter`` probes.  Probes are multiplied
        ``block_size`` at a time (one block product); samples past the stopping point
        are discarded, and the probes are drawn one by one from the seeded generator, so
        ``block_size`` changes the samples only by rounding.

        Returns:
            The list of per-probe samples (floats); ``np.mean`` of it estimates
            ``tr(H)`` with standard error ``np.std(samples, ddof=1) / sqrt(len)``.
        """
        max_iter = int(maxIter)
        if max_iter < 1:
            raise ValueError(f"maxIter must be >= 1, got {maxIter}.")
        op = self.operator
        gen, _ = make_generator(self._seed(seed), None, op.device)
        n = op.shape[0]
        samples: list[float] = []
        prev = 0.0
        while len(samples) < max_iter:
            b = min(int(block_size), max_iter - len(samples))
            # one probe at a time from the generator: the stream is the same for any block size
            V = torch.cat([rademacher(n, 1, generator=gen, dtype=op.dtype, device=op.device)
                           for _ in range(b)], dim=1)
            vals = (V * op.matmat(V)).sum(dim=0).tolist()
            for v in vals:
                samples.append(float(v))
                mean = float(np.mean(samples))
                if abs(mean - prev) / (abs(prev) + 1e-6) < tol:
                    return samples
                prev = mean
        return samples

    # ---------------------------------------------------------------------- density
    def density(self, iter: int = 100, n_v: int = 1,  # noqa: A002 - PyHessian's keyword
                *, seed: int | None = None) -> tuple[list[list[float]], list[list[float]]]:
        """Stochastic Lanczos quadrature: nodes and weights per probe.

        Args:
            iter: Lanczos steps per probe (capped at the number of parameters).
            n_v: number of probes (Rademacher, normalized).
            seed: overrides the instance seed.

        Returns:
            ``(eigen_list_full, weight_list_full)``: ``n_v`` lists of nodes (ascending)
            and ``n_v`` lists of weights (each summing to 1), as numpy float64 scalars
            (a subclass of ``float``).
        """
        from ..density import spectral_density

        steps, n_v = int(iter), int(n_v)
        if steps < 1 or n_v < 1:
            raise ValueError(f"iter and n_v must be >= 1, got iter={iter}, n_v={n_v}.")
        steps = min(steps, self.operator.shape[0])
        sd = spectral_density(self.operator, num_probes=n_v, num_steps=steps, seed=self._seed(seed))
        nodes = sd.nodes.detach().double().cpu().numpy()
        weights = sd.weights.detach().double().cpu().numpy()
        eigen_full, weight_full = [], []
        for l in range(n_v):
            keep = weights[l] > 0
            eigen_full.append(list(nodes[l][keep]))
            weight_full.append(list(weights[l][keep]))
        return eigen_full, weight_full
