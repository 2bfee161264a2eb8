"""Low-rank matrix sensing and completion problems, and their spectral initialization.

The problems follow the experiment scripts of Tong, Ma & Chi (JMLR 2021, ``MS.m`` /
``MC.m``) and Xu, Shen, Chi & Ma (ICML 2023):

* **ground truth** (:func:`low_rank_ground_truth`): ``X* = U* diag(s) V*^T`` with
  ``U*``, ``V*`` the orthonormalized columns of random +-1 matrices and singular values
  ``s = linspace(1, 1/kappa, r)`` (so ``sigma_max = 1``, condition number ``kappa``);
  ``symmetric=True`` gives the PSD ``U* diag(s) U*^T``.
* **sensing** (:class:`MatrixSensingProblem`): ``y_k = <A_k, X*>``, ``k = 1..m``, with
  i.i.d. ``N(0, 1/m)`` entries (near-isometric); loss ``f(X) = 1/2 ||A(X) - y||^2``.
  The design is stored as one ``[m, n1 n2]`` matrix (``storage="dense"``) or regenerated
  chunk by chunk from the seed at every product (``storage="on_the_fly"``: memory
  ``O(chunk * n1 n2)``, about 10x slower), so n = 200 with m = 10 000 fits either way.
* **completion** (:class:`MatrixCompletionProblem`): Bernoulli(p) mask ``Omega``; loss
  ``f(X) = 1/(2p) ||P_Omega(X - X*)||_F^2``.

Every problem exposes ``residual_gradient(X) -> Z`` (the gradient of ``f`` at the full
matrix ``X``, shape ``[n1, n2]``), so the factor gradients are ``Z R`` and ``Z^T L`` for
``X = L R^T`` and ``sym(Z) X`` for the PSD ``X X^T`` parameterization (where the PSD
loss is ``1/4 ||A(X X^T) - y||^2``), and ``spectral_matrix()`` for the initialization.
"""

from __future__ import annotations

import math
import torch
from torch import Tensor

__all__ = [
    "low_rank_ground_truth",
    "LowRankProblem",
    "MatrixSensingProblem",
    "MatrixCompletionProblem",
    "matrix_sensing_problem",
    "matrix_sensing_family",
    "matrix_completion_problem",
    "spectral_init",
    "small_random_init",
]


def _generator(seed: int, device) -> torch.Generator:
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed))
    return g


def low_rank_ground_truth(n1: int, n2: int, rank: int, kappa: float = 1.0, *, symmetric: bool = False,
                          right_from_left: bool = False, seed: int = 0, dtype: torch.dtype = torch.float64,
                          device="cpu"):
    """Rank-``rank`` truth with singular values ``linspace(1, 1/kappa, rank)``.

    ``right_from_left=True`` reproduces the official ``MS.m`` / ``MC.m`` instances: there
    ``V_star`` is computed as ``svds(U_seed, r)`` (not ``V_seed``), so ``V* = U*`` and the
    truth is the PSD ``U* diag(s) U*^T``, still fitted with two factors ``L R^T``.  The
    random signs are drawn for both factors either way (the same RNG calls as the
    script), so the left factor is identical with and without the flag.

    Returns:
        ``(X_star [n1, n2], L_star [n1, r], R_star [n2, r], singular_values [r])`` with
        ``X* = L* R*^T`` and the singular values split as square roots into both factors
        (``R* = L*`` when ``symmetric``).
    """
    if rank < 1 or rank > min(n1, n2):
        raise ValueError(f"rank must be in [1, min(n1, n2)] = [1, {min(n1, n2)}], got {rank}.")
    if not kappa >= 1:
        raise ValueError(f"kappa must be >= 1, got {kappa}.")
    if (symmetric or right_from_left) and n1 != n2:
        raise ValueError(f"A symmetric truth (or right_from_left) needs n1 == n2, got {n1} x {n2}.")
    g = _generator(seed, "cpu")
    sign = lambda n: torch.randint(0, 2, (n, rank), generator=g).to(torch.float64) * 2 - 1  # noqa: E731
    U = torch.linalg.qr(sign(n1))[0]
    V = U if symmetric else torch.linalg.qr(sign(n2))[0]
    if right_from_left:
        V = U
    s = torch.linspace(1.0, 1.0 / kappa, rank, dtype=torch.float64)
    L, R = U * s.sqrt(), V * s.sqrt()
    to = dict(dtype=dtype, device=device)
    return (L @ R.T).to(**to), L.to(**to), R.to(**to), s.to(**to)


class LowRankProblem:
    """Base class: a loss ``f(X)`` on ``n1 x n2`` matrices with a known gradient ``Z(X)``.

    Attributes:
        shape: ``(n1, n2)``.  X_star: the truth, or ``None`` (then ``relative_error``
            is unavailable and solvers stop on the relative residual).  rank: true rank
            if known.  dtype, device.
    """

    shape: tuple[int, int]
    X_star: Tensor | None
    rank: int | None
    symmetric: bool

    def residual_gradient(self, X: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``grad f(X)``, shape ``[n1, n2]``."""
        raise NotImplementedError

    def loss(self, X: Tensor) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss_and_gradient(self, X: Tensor) -> tuple[float, Tensor]:
        """``(f(X), grad f(X))``; sensing overrides it to share the residual (one pass fewer)."""
        return self.loss(X), self.residual_gradient(X)

    def spectral_matrix(self) -> Tensor:  # pragma: no cover - abstract
        """The unbiased back-projection (``A*(y)`` or ``Y / p``) used for spectral init."""
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return self.y.dtype

    @property
    def device(self) -> torch.device:
        return self.y.device

    def relative_error(self, X: Tensor) -> float:
        """``||X - X*||_F / ||X*||_F``."""
        if self.X_star is None:
            raise ValueError("This problem has no ground truth X_star.")
        return float(torch.linalg.matrix_norm(X - self.X_star) / torch.linalg.matrix_norm(self.X_star))

    def _check_X(self, X: Tensor) -> None:
        if tuple(X.shape) != tuple(self.shape):
            raise ValueError(f"Dimension mismatch: X has shape {tuple(X.shape)}, the problem is {self.shape}.")


def _check_finite(name: str, t: Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf entries.")


class MatrixSensingProblem(LowRankProblem):
    """``y_k = <A_k, X*>`` with Gaussian ``A_k`` (entries ``N(0, 1/m)``), seeded.

    Args:
        shape: ``(n1, n2)``.
        num_measurements: ``m``.
        y: measurements ``[m]``; default ``A(X_star)``.
        X_star: the truth (optional if ``y`` is given).
        seed: seed of the design (the same seed always gives the same ``A``).
        storage: ``"dense"`` (``m * n1 * n2`` numbers in memory, generated chunk by chunk
            into one preallocated buffer, never held twice) or ``"on_the_fly"``.
        chunk_size: measurements generated per chunk (both storages draw the same design).
        dtype, device: of the design and the iterates.
        design: share the design of another dense problem with the same shape, ``m``,
            seed, chunk size and dtype (no copy: the same tensor), so that many truths
            can be measured by one ``A`` (:func:`matrix_sensing_family`).

    Cost: each ``A(X)`` / ``A*(r)`` reads (or regenerates) the ``m x n1 n2`` design once,
    for one matrix or for a stack of ``k`` (``[k, n1, n2]`` / ``[k, m]``: one ``[m, n1 n2]
    @ [n1 n2, k]`` product, about the time of one when memory-bound).
    """

    def __init__(self, shape, num_measurements: int, *, y: Tensor | None = None, X_star: Tensor | None = None,
                 rank: int | None = None, seed: int = 0, storage: str = "dense", chunk_size: int = 512,
                 dtype: torch.dtype = torch.float64, device="cpu", symmetric: bool = False,
                 design: "MatrixSensingProblem | None" = None) -> None:
        n1, n2 = (int(s) for s in shape)
        m = int(num_measurements)
        if m < 1:
            raise ValueError(f"num_measurements must be >= 1, got {num_measurements}.")
        if storage not in ("dense", "on_the_fly"):
            raise ValueError(f"storage must be 'dense' or 'on_the_fly', got {storage!r}.")
        self.shape, self.m, self.seed, self.storage = (n1, n2), m, int(seed), storage
        self.chunk_size = max(1, int(chunk_size))
        self._dtype, self._device = dtype, torch.device(device)
        self.rank, self.symmetric = rank, symmetric
        self.A = None
        if design is not None:
            if not (isinstance(design, MatrixSensingProblem) and design.A is not None and self.same_design(design)):
                raise ValueError("design= must be a dense MatrixSensingProblem with the same shape, num_measurements, "
                                 "seed, chunk_size, dtype and device (it shares its design tensor).")
            if storage != "dense":
                raise ValueError("design= shares a dense design; use storage='dense'.")
            self.A = design.A
        elif storage == "dense":
            A = torch.empty(m, n1 * n2, dtype=dtype, device=self._device)
            for lo, hi, Ak in self._chunks():
                A[lo:hi] = Ak
            self.A = A
        if X_star is not None:
            X_star = X_star.to(dtype=dtype, device=self._device)
            self._check_X(X_star)
            _check_finite("X_star", X_star)
        self.X_star = X_star
        if y is None:
            if X_star is None:
                raise ValueError("Give the measurements y or the truth X_star.")
            y = self.apply(X_star)
        y = torch.as_tensor(y, dtype=dtype, device=self._device)
        if y.shape != (m,):
            raise ValueError(f"Dimension mismatch: y has shape {tuple(y.shape)}, expected ({m},).")
        _check_finite("The measurements y", y)
        self.y = y

    def same_design(self, other: "MatrixSensingProblem") -> bool:
        """Whether ``other`` draws the same ``A`` (shape, ``m``, seed, chunking, dtype, device)."""
        key = lambda p: (p.shape, p.m, p.seed, p.chunk_size, p._dtype, p._device)  # noqa: E731
        return key(self) == key(other)

    def _make_chunk(self, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of the design; chunk ``c`` always comes from seed ``(seed, c)``."""
        n = self.shape[0] * self.shape[1]
        rows = []
        c0, c1 = start // self.chunk_size, (stop - 1) // self.chunk_size
        for c in range(c0, c1 + 1):
            g = _generator(self.seed * 1_000_003 + c, self._device)
            lo = c * self.chunk_size
            size = min(self.chunk_size, self.m - lo)
            rows.append(torch.randn(size, n, generator=g, dtype=self._dtype, device=self._device))
        out = rows[0] if len(rows) == 1 else torch.cat(rows)
        out = out[start - c0 * self.chunk_size: stop - c0 * self.chunk_size]
        return out.mul_(1.0 / math.sqrt(self.m))

    def _chunks(self):
        for lo in range(0, self.m, self.chunk_size):
            hi = min(lo + self.chunk_size, self.m)
            yield lo, hi, self._make_chunk(lo, hi)

    def apply(self, X: Tensor) -> Tensor:
        """``A(X) = [<A_k, X>]_k``: ``[n1, n2] -> [m]``, or a stack ``[k, n1, n2] -> [k, m]``."""
        if X.dim() == 3:
            self._check_X(X[0])
        else:
            self._check_X(X)
        x = X.reshape(-1, self.shape[0] * self.shape[1]).T  # [n1 n2, k]
        if self.A is not None:
            out = self.A @ x
        else:
            out = torch.cat([Ak @ x for _, _, Ak in self._chunks()])
        return out.T.reshape(X.shape[:-2] + (self.m,))

    def adjoint(self, r: Tensor) -> Tensor:
        """``A*(r) = sum_k r_k A_k``: ``[m] -> [n1, n2]``, or a stack ``[k, m] -> [k, n1, n2]``."""
        if r.shape[-1] != self.m or r.dim() > 2:
            raise ValueError(f"Dimension mismatch: r has shape {tuple(r.shape)}, expected ({self.m},) or (k, {self.m}).")
        R = r.reshape(-1, self.m)
        if self.A is not None:
            out = R @ self.A
        else:
            out = torch.zeros(R.shape[0], self.shape[0] * self.shape[1], dtype=r.dtype, device=r.device)
            for lo, hi, Ak in self._chunks():
                out += R[:, lo:hi] @ Ak
        return out.reshape(r.shape[:-1] + self.shape)

    def residual_gradient(self, X: Tensor) -> Tensor:
        return self.adjoint(self.apply(X) - self.y)

    def loss_and_gradient(self, X: Tensor) -> tuple[float, Tensor]:
        res = self.apply(X) - self.y
        return 0.5 * float((res * res).sum()), self.adjoint(res)

    def loss(self, X: Tensor) -> float:
        return 0.5 * float(((self.apply(X) - self.y) ** 2).sum())

    def spectral_matrix(self) -> Tensor:
        return self.adjoint(self.y)


class MatrixCompletionProblem(LowRankProblem):
    """Entries of ``X*`` observed on a Bernoulli(``p``) mask; ``f = 1/(2p) ||P_Omega(X - X*)||^2``.

    Args:
        X_star: the truth ``[n1, n2]`` (or give ``Y`` = observed matrix, zero off the
            mask, and ``mask``).
        p: observation probability.
        mask: optional boolean mask; default Bernoulli(p) from ``seed``.
    """

    def __init__(self, X_star: Tensor | None = None, p: float = 0.2, *, mask: Tensor | None = None,
                 Y: Tensor | None = None, rank: int | None = None, seed: int = 0, symmetric: bool = False) -> None:
        if not 0 < p <= 1:
            raise ValueError(f"p must be in (0, 1], got {p}.")
        ref = X_star if X_star is not None else Y
        if ref is None:
            raise ValueError("Give the truth X_star or the observed matrix Y with its mask.")
        self.shape = tuple(ref.shape)
        if mask is None:
            g = _generator(seed, ref.device)
            mask = torch.rand(self.shape, generator=g, dtype=torch.float64, device=ref.device) < p
        if tuple(mask.shape) != self.shape:
            raise ValueError(f"Dimension mismatch: mask {tuple(mask.shape)} vs matrix {self.shape}.")
        self.mask = mask.to(dtype=ref.dtype)
        if X_star is not None:
            _check_finite("X_star", X_star)
        self.X_star = X_star
        Y = X_star * self.mask if Y is None else Y
        _check_finite("The observed entries Y", Y)
        self.Y, self.p, self.rank, self.symmetric = Y, float(p), rank, symmetric
        self.y = Y  # dtype/device carrier

    def residual_gradient(self, X: Tensor) -> Tensor:
        self._check_X(X)
        return (self.mask * X - self.Y) / self.p

    def loss(self, X: Tensor) -> float:
        return float(((self.mask * X - self.Y) ** 2).sum()) / (2 * self.p)

    def spectral_matrix(self) -> Tensor:
        return self.Y / self.p


def matrix_sensing_problem(n: int, rank: int, kappa: float = 1.0, *, n2: int | None = None,
                           num_measurements: int | None = None, psd: bool = False, right_from_left: bool = False,
                           seed: int = 0, storage: str = "dense", dtype: torch.dtype = torch.float64,
                           device="cpu") -> MatrixSensingProblem:
    """The Figure-2 sensing problem: truth of :func:`low_rank_ground_truth`, ``m`` (default ``5 n r``)
    Gaussian measurements.  ``psd=True``: PSD truth for the ``X X^T`` / ScaledGD(lambda) case;
    ``right_from_left=True``: the official script's ``V* = U*`` truth (see
    :func:`low_rank_ground_truth`)."""
    n2 = n if n2 is None else n2
    m = num_measurements or 5 * max(n, n2) * rank
    X_star, *_ = low_rank_ground_truth(n, n2, rank, kappa, symmetric=psd, right_from_left=right_from_left,
                                       seed=seed, dtype=dtype, device=device)
    return MatrixSensingProblem((n, n2), m, X_star=X_star, rank=rank, seed=seed + 1, storage=storage,
                                dtype=dtype, device=device, symmetric=psd)


def matrix_sensing_family(n: int, rank: int, kappas, *, n2: int | None = None,
                          num_measurements: int | None = None, psd: bool = False, right_from_left: bool = False,
                          seed: int = 0, dtype: torch.dtype = torch.float64,
                          device="cpu") -> list[MatrixSensingProblem]:
    """:func:`matrix_sensing_problem` for every ``kappa`` in ``kappas``, all measured by ONE dense
    design (the one each would draw alone at this seed; it does not depend on ``kappa``), so
    memory holds ``m n1 n2`` numbers once and :func:`~solvers.scaled_gd.scaled_gd_lockstep`
    can advance all runs with one pair of products per iteration."""
    kappas = list(kappas)
    if not kappas:
        raise ValueError("kappas is empty.")
    first = matrix_sensing_problem(n, rank, kappas[0], n2=n2, num_measurements=num_measurements, psd=psd,
                                   right_from_left=right_from_left, seed=seed, dtype=dtype, device=device)
    out = [first]
    for kappa in kappas[1:]:
        X_star, *_ = low_rank_ground_truth(n, first.shape[1], rank, kappa, symmetric=psd,
                                           right_from_left=right_from_left, seed=seed, dtype=dtype, device=device)
        out.append(MatrixSensingProblem(first.shape, first.m, X_star=X_star, rank=rank, seed=first.seed,
                                        dtype=dtype, device=device, symmetric=psd, design=first))
    return out


def matrix_completion_problem(n: int, rank: int, kappa: float = 1.0, *, n2: int | None = None, p: float = 0.2,
                              right_from_left: bool = False, seed: int = 0, dtype: torch.dtype = torch.float64,
                              device="cpu") -> MatrixCompletionProblem:
    """The Figure-2 completion problem: truth of :func:`low_rank_ground_truth`, Bernoulli(p) mask
    (the same mask for every ``kappa`` at a fixed seed, as in ``MC.m``)."""
    n2 = n if n2 is None else n2
    X_star, *_ = low_rank_ground_truth(n, n2, rank, kappa, right_from_left=right_from_left, seed=seed,
                                       dtype=dtype, device=device)
    return MatrixCompletionProblem(X_star, p, rank=rank, seed=seed + 1)


def spectral_init(problem: LowRankProblem, rank: int, *, psd: bool = False):
    """Top-``rank`` SVD of ``problem.spectral_matrix()``: ``L0 = U S^{1/2}``, ``R0 = V S^{1/2}``.

    For ``psd`` returns ``X0 = U_r max(Lambda_r, 0)^{1/2}`` from the symmetrized matrix's
    top eigenpairs.  Cost: one dense SVD / eigendecomposition of an ``n1 x n2`` matrix.
    """
    M = problem.spectral_matrix()
    if rank < 1 or rank > min(M.shape):
        raise ValueError(f"rank must be in [1, {min(M.shape)}], got {rank}.")
    if psd:
        evals, evecs = torch.linalg.eigh(0.5 * (M + M.T))
        lam, U = evals[-rank:].flip(0), evecs[:, -rank:].flip(1)
        return U * lam.clamp(min=0).sqrt()
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    root = S[:rank].sqrt()
    return U[:, :rank] * root, Vh[:rank].T * root


def small_random_init(n: int, rank: int, *, scale: float = 1e-3, seed: int = 0, dtype=torch.float64,
                      device="cpu") -> Tensor:
    """``X0 = alpha G`` with ``G_ij ~ N(0, 1/n)`` (ScaledGD(lambda)'s small random initialization)."""
    g = _generator(seed, device)
    return scale * torch.randn(n, rank, generator=g, dtype=dtype, device=device) / math.sqrt(n)
