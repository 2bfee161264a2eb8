"""The Lanczos tridiagonalization with full reorthogonalization.

``lanczos(op, m)`` runs ``m`` steps from one start vector and returns the basis ``Q``
(``[n, m]``), the tridiagonal coefficients and the next vector, so that

    A Q = Q T + beta_m q_{m+1} e_m^T,      Q^T Q = I,      T = tridiag(beta, alpha, beta).

The engine, :func:`lanczos_batched`, runs ``p`` independent Lanczos processes side by
side so that each step multiplies one block ``[n, p]`` (``op @ V``): stochastic Lanczos
quadrature sends all its probes at once.  Reorthogonalization is classical Gram-Schmidt
after the three-term recurrence, once against all previous vectors of the same process
and a second time only where the first pass removed more than 30% of the norm (the
DGKS test; "twice is enough", Giraud et al. 2005), so the basis stays orthonormal to
rounding and no ghost copies of converged eigenvalues appear.  Cost per step: the block
product plus two (rarely four) passes over the basis.  Memory: ``p (m + 1) n`` numbers.

A process that reaches an invariant subspace (``beta_j <= 100 eps ||T||``) stops after
``j`` steps: its quadrature is then exact and further steps would be noise.

Precision: the basis, the coefficients and the reorthogonalization are kept in the
working dtype of :func:`estimators._precision.working_dtype`: the operator's dtype for
float32/float64, float32 for float16/bfloat16 operators (whose products are still done
in their own dtype; LAPACK has no half-precision ``eigh``, and half-precision
Gram-Schmidt would lose orthogonality at once).  Results come back in that dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvature import LinearOperator

from ._precision import LOW_PRECISION, working_dtype
from ._probes import check_square, make_generator
from ._validate import check_int
from .results import LanczosResult

__all__ = ["lanczos", "lanczos_batched", "eigh_small"]


def eigh_small(H: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` of small projected matrices ``[..., m, m]``, single-threaded.

    For the ``m x m`` (m <= a few hundred) problems here the thread pool's start-up
    cost dominates; on a loaded machine it made a 40 x 40 ``eigh`` 100x slower.
    """
    if H.dtype in LOW_PRECISION:
        H = H.to(torch.float32)
    if H.device.type != "cpu" or H.shape[-1] > 256:
        return torch.linalg.eigh(H)
    prev = torch.get_num_threads()
    if prev == 1:
        return torch.linalg.eigh(H)
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(H)
    finally:
        torch.set_num_threads(prev)


def _cgs_pass(B: Tensor, W: Tensor) -> Tensor:
    """``W - B^T (B W)`` per process (``B [a, j, n]``, ``W [a, n]``): two passes over ``B``."""
    if B.shape[0] == 1:  # one process: matrix-vector products, no batch bookkeeping
        b = B[0]
        return (W[0] - (b @ W[0]) @ b).unsqueeze(0)
    c = torch.bmm(B, W.unsqueeze(2))
    return W - torch.bmm(B.transpose(1, 2), c).squeeze(2)


def lanczos_batched(
    op: LinearOperator,
    V0: Tensor,
    num_steps: int,
    *,
    reorthogonalize: bool = True,
    return_basis: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Run ``p`` independent Lanczos processes, one per column of ``V0``.

    Args:
        op: a symmetric operator ``[n, n]``.
        V0: ``[n, p]`` nonzero start vectors (normalized here).
        num_steps: steps ``m`` per process (at most ``n``).
        reorthogonalize: full reorthogonalization (needs the ``p (m+1) n`` basis in
            memory); ``False`` keeps only three vectors per process (ghost eigenvalues
            may appear; quadrature weights stay right to first order).
        return_basis: also return the bases.

    Returns:
        ``(alphas [p, m], betas [p, m], lengths [p], basis)`` in the working dtype
        (float32 for 16-bit operators, else the operator's), where process ``i`` ran
        ``lengths[i]`` steps (entries after it are zero; ``betas[i, lengths[i] - 1]``
        is its final ``beta``) and ``basis`` is ``[p, m + 1, n]`` (row ``j`` is
        ``q_{j+1}``) or ``None``.

    Cost: ``sum(lengths)`` products in ``max(lengths)`` block products, plus
    ``O(p m^2 n)`` flops for reorthogonalization (one Gram-Schmidt pass per step, two
    where the DGKS test asks for it).
    """
    n = check_square(op, "Lanczos", symmetric=True)
    if V0.dim() != 2 or V0.shape[0] != n:
        raise ValueError(f"Start vectors must have shape [{n}, p], got {tuple(V0.shape)}.")
    p = V0.shape[1]
    m = check_int(num_steps, "num_steps", minimum=None)
    if m < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}.")
    m = min(m, n)
    dtype, device = op.dtype, op.device
    wdtype = working_dtype(dtype)
    V0 = V0.to(device=device, dtype=wdtype)
    norms = V0.norm(dim=0)
    if not bool((norms > 0).all()) or not bool(torch.isfinite(norms).all()):
        raise ValueError("Lanczos start vectors must be finite and nonzero.")
    eps = torch.finfo(wdtype).eps
    keep_all = reorthogonalize or return_basis
    Q = V0.new_zeros(p, (m + 1) if keep_all else 3, n)
    Q[:, 0] = (V0 / norms).T
    alphas = V0.new_zeros(p, m)
    betas = V0.new_zeros(p, m)
    lengths = torch.full((p,), m, dtype=torch.long)
    anorm = V0.new_zeros(p)
    active = torch.arange(p, device=device)
    for j in range(m):
        a = active.numel()
        cur = j if keep_all else j % 3
        prev = (j - 1) if keep_all else (j - 1) % 3
        nxt = (j + 1) if keep_all else (j + 1) % 3
        all_active = a == p
        Qa = Q if all_active else Q[active]
        q = Qa[:, cur]  # [a, n]
        W = op.matmat(q.T.to(dtype).contiguous()).T.to(wdtype)  # [a, n]
        alpha = (W * q).sum(dim=1)
        W = W - alpha[:, None] * q
        if j > 0:
            W = W - betas[active, j - 1][:, None] * Qa[:, prev]
        if reorthogonalize:
            # after the three-term recurrence W is orthogonal to the basis up to rounding:
            # one classical Gram-Schmidt pass, and a second only where the first removed
            # more than 30% of the norm (DGKS; Daniel, Gragg, Kaufman, Stewart 1976)
            B = Qa[:, : j + 1]  # [a, j+1, n]
            n0 = W.norm(dim=1)
            W = _cgs_pass(B, W)
            if bool((W.norm(dim=1) < 0.7 * n0).any()):
                W = _cgs_pass(B, W)
        beta = W.norm(dim=1)
        alphas[active, j] = alpha
        prev_beta = betas[active, j - 1] if j > 0 else torch.zeros_like(beta)
        anorm[active] = torch.maximum(anorm[active], alpha.abs() + beta + prev_beta)
        broke = beta <= 100 * eps * anorm[active]
        beta = torch.where(broke, torch.zeros_like(beta), beta)
        betas[active, j] = beta
        safe = torch.where(broke, torch.ones_like(beta), beta)
        newq = torch.where(broke[:, None], torch.zeros_like(W), W / safe[:, None])
        if all_active:
            Q[:, nxt] = newq
        else:
            Q[active, nxt] = newq
        if bool(broke.any()):
            lengths[active[broke].cpu()] = j + 1
            active = active[~broke]
            if active.numel() == 0:
                break
    return alphas, betas, lengths, (Q if return_basis and keep_all else None)


def lanczos(
    op: LinearOperator,
    num_steps: int,
    v0: Tensor | None = None,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    reorthogonalize: bool = True,
) -> LanczosResult:
    """``num_steps`` Lanczos steps on a symmetric operator.

    Args:
        op: symmetric ``LinearOperator`` ``[n, n]`` (only ``op @ V`` is used).
        num_steps: ``m``; capped at ``n``.  Fewer steps are returned if the Krylov
            space becomes invariant (then ``betas[-1] == 0`` and ``A Q = Q T`` exactly).
        v0: start vector ``[n]`` (normalized here); default a Gaussian vector drawn
            from ``seed``/``generator``.
        seed, generator: randomness for the default start vector.
        reorthogonalize: full reorthogonalization (default; recommended).

    Returns:
        :class:`~estimators.results.LanczosResult` with ``basis [n, m]``,
        ``alphas [m]``, ``betas [m]``, ``next_vector [n]`` (float32 for 16-bit
        operators, else the operator's dtype); cost ``m`` products.

    Raises:
        ValueError: non-square or non-symmetric operator, ``num_steps < 1``, zero ``v0``.
        FloatingPointError: the operator produced NaN/inf.
    """
    n = check_square(op, "lanczos", symmetric=True)
    check_int(num_steps, "num_steps", minimum=None)
    if v0 is None:
        gen, seed = make_generator(seed, generator, op.device)
        v0 = torch.randn(n, generator=gen, device=op.device, dtype=op.dtype)
    else:
        seed = None
        if not isinstance(v0, Tensor) or v0.shape != (n,):
            raise ValueError(f"v0 must have shape [{n}], got {getattr(v0, 'shape', v0)!r}.")
        v0 = v0.to(device=op.device)
    before = op.num_matvecs
    alphas, betas, lengths, Q = lanczos_batched(
        op, v0.unsqueeze(1), num_steps, reorthogonalize=reorthogonalize, return_basis=True
    )
    m = int(lengths[0])
    return LanczosResult(
        basis=Q[0, :m].T.contiguous(),
        alphas=alphas[0, :m].clone(),
        betas=betas[0, :m].clone(),
        next_vector=Q[0, m].clone(),
        num_matvecs=op.num_matvecs - before,
        seed=seed,
    )
