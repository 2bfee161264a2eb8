"""The thick-restart Lanczos (Krylov-Schur) state behind :func:`estimators.top_eigenvalues`.

The state is the Krylov-Schur relation (column form; everything of length ``n`` is
stored as rows so that the first ``m`` are one contiguous ``[m, n]`` block):

    A V = V F + G C^T + E,        V^T V = I,  V^T G = 0   (to rounding)

* ``V [m, n]``: the orthonormal basis, in the *basis dtype* (float64 by default,
  float32 on request: half the memory and the memory traffic);
* ``F [m, m]``: the computed coefficients ``V^T A V`` column by column (float64); it is
  symmetric in exact arithmetic, its skew part is the products' rounding, and
  ``H = sym(F)`` (upper triangle mirrored) is the projected matrix of Rayleigh-Ritz;
* ``G [j, n]``: the residual block (float64), the next Lanczos block; ``C [m, j]``
  couples it to the basis (``[0; I]`` after a step, ``Y^T C`` after a restart);
* ``E``: what the relation leaves out: the rounding of the bookkeeping (stored vectors,
  eigh, restart rotations; modelled by :meth:`KrylovSchur.basis_rounding`) and residual
  rows dropped as numerically dependent (their norms summed in ``drift``).

For a Ritz pair ``(theta, y)`` of ``H``

    A V y - theta V y = V (F - H) y + G C^T y + E y,

so the residual of the stored products is bounded by
``||(F - H) y|| + ||G C^T y|| + drift`` in ``O(m^2)``, without touching ``V``: no
second copy ``W = A V`` is kept and no residual vector is formed.

Cost per step of ``j`` new vectors (``b = j = 1`` is plain Lanczos): the block product;
the local recurrence against the rows that ``C`` couples (one row after a step, the kept
rows after a restart); one classical Gram-Schmidt pass ``c = V g``, ``g -= V^T c`` over
the whole basis (two ``[m, n]`` matrix-vector products), and a second pass only when
the first removed more than 30% of the norm (the DGKS test; after the local recurrence
``g`` is orthogonal to ``V`` up to rounding, so one pass is the rule).  A restart is one
``[keep, m] x [m, n]`` product into the front rows.  The Ritz problem is ``O(m^3)``.

Precision.  With a float32 basis the long dot products of the Gram-Schmidt pass are
float32 (they only decide what is subtracted, and the relation holds for whatever was
subtracted); the coefficients that the rounding measurement reads (the local recurrence,
the new diagonal block, and ``q^T A v`` against ``v^T A q`` for consecutive blocks, with
the previous block's products kept for it) are accumulated in float64, and a restart
rotates the basis in float64 before storing it back.  Storing a vector in float32 moves
it by up to ``u_32`` relative: ``basis_rounding`` models that as ``u_32 ||A||`` per
restart (random-walk sum), and the caller adds it to the products' rounding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvature import LinearOperator

from ._precision import matmat_in

__all__ = ["KrylovSchur", "BASIS_DTYPES"]

BASIS_DTYPES = (torch.float32, torch.float64)
_CHUNK = 1 << 15  # columns per chunk when float32 rows are upcast (keeps the temporaries small)


def rows_dot(Vr: Tensor, X: Tensor) -> Tensor:
    """``Vr @ X^T`` accumulated in ``X.dtype`` (``Vr [r, n]`` any float dtype, ``X [j, n]``): ``[r, j]``."""
    if Vr.dtype == X.dtype:
        return Vr @ X.T
    n = X.shape[1]
    out = X.new_zeros(Vr.shape[0], X.shape[0])
    for s in range(0, n, _CHUNK):
        out += Vr[:, s:s + _CHUNK].to(X.dtype) @ X[:, s:s + _CHUNK].T
    return out


def rows_combine(Cf: Tensor, Vr: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``Cf @ Vr`` (``Cf [j, r]``, ``Vr [r, n]``) accumulated and returned in ``out_dtype``: ``[j, n]``."""
    if Vr.dtype == out_dtype:
        return Cf.to(out_dtype) @ Vr
    n = Vr.shape[1]
    out = torch.empty(Cf.shape[0], n, device=Vr.device, dtype=out_dtype)
    Cw = Cf.to(out_dtype)
    for s in range(0, n, _CHUNK):
        torch.mm(Cw, Vr[:, s:s + _CHUNK].to(out_dtype), out=out[:, s:s + _CHUNK])
    return out


class KrylovSchur:
    """Basis, projected matrix and residual block of thick-restart Lanczos (module docstring).

    Args:
        op: the symmetric operator (products in ``op.dtype``).
        max_basis: rows of the preallocated basis ``[max_basis, n]``.
        basis_dtype: dtype of the stored basis (float32 or float64).
        wdtype: dtype of the small matrices and of the residual block (float64 for
            operators in float32 or below, else the operator's).
    """

    def __init__(self, op: LinearOperator, max_basis: int, basis_dtype: torch.dtype, wdtype: torch.dtype) -> None:
        n = op.shape[0]
        self.op, self.n, self.mb = op, n, max_basis
        self.bdtype, self.wdtype = basis_dtype, wdtype
        dev = op.device
        self.V = torch.empty(max_basis, n, device=dev, dtype=basis_dtype)
        self.H = torch.zeros(max_basis, max_basis, device=dev, dtype=wdtype)
        self.F = torch.zeros(max_basis, max_basis, device=dev, dtype=wdtype)
        self.C = torch.zeros(max_basis, 0, device=dev, dtype=wdtype)
        self.G = torch.zeros(0, n, device=dev, dtype=wdtype)
        self.GG = torch.zeros(0, 0, device=dev, dtype=wdtype)
        self.m = 0
        self.lo = 0  # C is zero above row lo
        self.drift = torch.zeros((), device=dev, dtype=wdtype)
        self.skew_sq = torch.zeros((), device=dev, dtype=wdtype)
        self.skew_count = 0
        self.exact_dots = basis_dtype == wdtype
        self.restarts = 0
        self.W_prev: Tensor | None = None  # float32 basis: the last block's products (skew samples)
        self.prev_rows = (0, 0)
        self.u_basis = torch.finfo(basis_dtype).eps / 2

    # ------------------------------------------------------------------ passes
    def _cgs_pass(self, g: Tensor, rows: int) -> Tensor:
        """One classical Gram-Schmidt pass of ``g [j, n]`` against ``V[:rows]``, in place; the coefficients ``[rows, j]``."""
        Vr = self.V[:rows]
        gb = g if g.dtype == self.bdtype else g.to(self.bdtype)
        c = Vr @ gb.T
        upd = c.T @ Vr
        g -= upd if upd.dtype == g.dtype else upd.to(g.dtype)
        return c if c.dtype == self.wdtype else c.to(self.wdtype)

    def _orthonormal_rows(self, D: Tensor, drop_rel: float, drop_abs: Tensor | float) -> tuple[Tensor, Tensor]:
        """Modified Gram-Schmidt among the rows of ``D [j, n]``: ``(Q [j', n], R [j', j])`` with ``D ~= R^T Q``.

        A row whose norm after orthogonalization is at most ``max(drop_rel ||d_i||,
        drop_abs)`` is dropped (it lies in the span already).
        """
        j = D.shape[0]
        qs, rs = [], []
        for i in range(j):
            d = D[i].clone()
            coef = D.new_zeros(j)
            n0 = d.norm()
            for _ in range(2):
                for l, q in enumerate(qs):
                    a = q @ d
                    d -= a * q
                    rs[l][i] += a
            nd = d.norm()
            if bool(nd > torch.maximum(drop_rel * n0, torch.as_tensor(drop_abs, dtype=nd.dtype))):
                q = d / nd
                coef[i] = nd
                qs.append(q)
                rs.append(coef)
        if not qs:
            return D.new_zeros(0, D.shape[1]), D.new_zeros(0, j)
        return torch.stack(qs), torch.stack(rs)

    # ------------------------------------------------------------------ growth
    def extend(self, Q: Tensor, K: Tensor | None) -> None:
        """Append the rows ``Q [j, n]`` (orthonormal, orthogonal to ``V``, values exact in the basis dtype).

        ``K [m, j]`` is their known coupling ``V^T A Q = C R^T`` from the relation (``None``
        for a fresh direction).  Costs ``j`` products.
        """
        m, j, wd = self.m, Q.shape[0], self.wdtype
        self.V[m:m + j] = Q
        Wr = matmat_in(self.op, self.V[m:m + j].T, wd).T
        Dcol = Q @ Wr.T  # [j, j], Dcol[l, i] = q_l . w_i
        g = Wr - Dcol.T @ Q
        coef = Wr.new_zeros(m + j, j)
        coef[m:] = Dcol
        Kfull = Wr.new_zeros(m, j)
        lo = self.lo
        if K is not None and m > lo:
            Vs = self.V[lo:m]
            Kact = rows_dot(Vs, Wr)  # the local recurrence, accurate in wdtype
            g -= rows_combine(Kact.T, Vs, wd)
            coef[lo:m] = Kact
            Kfull[lo:m] = K[lo:m]
            if not self.exact_dots and self.W_prev is not None and self.prev_rows == (lo, m):
                # float32 basis: the float32 Gram-Schmidt pass leaves the rows orthogonal to
                # ~u_32 only, too little for the relation's coupling K to stand in for
                # q^T A v (the skew sample is amplified by sqrt(n)); compare the two
                # products directly instead, both accumulated in float64
                self._record_skew(Kact - (Q @ self.W_prev.T).T)
        n0 = g.norm(dim=1)
        coef += self._cgs_pass(g, m + j)
        if bool((g.norm(dim=1) < 0.7 * n0).any()):
            coef += self._cgs_pass(g, m + j)
        if self.exact_dots:
            # rows the relation couples to Q compare two products (v^T A q - q^T A v); the
            # others compare one product with the relation's exact zero: half the variance
            one_sided = torch.ones(m, 1, device=g.device, dtype=wd)
            one_sided[lo:m] = 0 if K is not None else 1
            self._record_skew((coef[:m] - Kfull) * (1 + one_sided * (math.sqrt(2) - 1)))
            blk = coef[m:]
        else:
            blk = Dcol
        iu = torch.triu_indices(j, j, 1, device=blk.device)
        if iu.shape[1]:
            self._record_skew((blk - blk.T)[iu[0], iu[1]])
        self.F[:m + j, m:m + j] = coef
        self.F[m:m + j, :m] = Kfull.T
        self.H[:m + j, m:m + j] = coef
        self.H[m:m + j, :m] = coef[:m].T
        self.H[m:m + j, m:m + j] = 0.5 * (coef[m:] + coef[m:].T)
        self.G = g
        self.GG = g @ g.T
        if not self.exact_dots:
            self.W_prev, self.prev_rows = Wr, (m, m + j)
        self.C = Wr.new_zeros(self.mb, j)
        self.C[m:m + j] = torch.eye(j, device=Wr.device, dtype=wd)
        self.lo = m
        self.m = m + j

    def _record_skew(self, s: Tensor) -> None:
        self.skew_sq += s.square().sum()
        self.skew_count += s.numel()

    def append_fresh(self, D: Tensor, drop_rel: float) -> int:
        """Orthonormalize the rows ``D [j, n]`` against ``V`` (two passes) and append them (no coupling).

        The residual block ``G`` is discarded (it must be negligible: an invariant subspace,
        or the start); its norm goes into ``drift``.  Returns the rows appended.
        """
        D = D.clone()
        for _ in range(2):
            if self.m:
                self._cgs_pass(D, self.m)
        Q, _ = self._orthonormal_rows(D, drop_rel, 0.0)
        if Q.shape[0] == 0:
            return 0
        if self.G.shape[0]:
            self.drift += self.G.norm()
        self.extend(self._stored(Q), None)
        return Q.shape[0]

    def residual_breakdown(self, tiny: Tensor) -> Tensor:
        """Whether every row of ``G`` is at most ``tiny`` (an invariant subspace, on the device)."""
        return (torch.diagonal(self.GG).clamp(min=0).sqrt() <= tiny).all()

    def advance(self, drop_rel: float, tiny: Tensor) -> int:
        """Append the residual block ``G`` as the next Lanczos block; the rows appended (``0``: breakdown)."""
        G, m = self.G, self.m
        if G.shape[0] == 1:
            beta = self.GG[0, 0].clamp(min=0).sqrt()
            Q, R = G / beta, beta.reshape(1, 1)
        else:
            Q, R = self._orthonormal_rows(G, drop_rel, tiny)
            if Q.shape[0] == 0:
                return 0
            if Q.shape[0] < G.shape[0]:
                # dropped rows leave a (small, not rounding-sized) part of G out of the relation
                self.drift += (G - R.T @ Q).norm()
        # storing Q in the basis dtype moves it by <= u_basis: modelled in basis_rounding
        self.extend(self._stored(Q), self.C[:m] @ R.T)
        return Q.shape[0]

    def _stored(self, Q: Tensor) -> Tensor:
        """``Q`` rounded to the basis dtype (values in ``wdtype``)."""
        return Q if self.exact_dots else Q.to(self.bdtype).to(self.wdtype)

    # ------------------------------------------------------------------ Ritz pairs
    def residual_norms(self, Ys: Tensor) -> Tensor:
        """Bounds on ``||A V y_i - theta_i V y_i||`` for unit Ritz vectors ``Ys [m, s]`` of ``H`` (``O(m^2 s)``)."""
        m = self.m
        S = self.F[:m, :m] - self.H[:m, :m]
        a = (S @ Ys).norm(dim=0)
        z = self.C[:m].T @ Ys  # [j, s]
        b = (z * (self.GG @ z)).sum(0).clamp(min=0).sqrt()
        return a + b + self.drift

    def restart(self, Yk: Tensor) -> None:
        """Keep the Ritz vectors ``V Yk`` (``Yk [m, keep]`` orthonormal eigenvectors of ``H``)."""
        m, keep, wd = self.m, Yk.shape[1], self.wdtype
        Vm = self.V[:m]
        Yt = Yk.T.contiguous()
        n = self.n
        step = n if self.exact_dots else _CHUNK
        for s in range(0, n, step):  # column chunks are independent: write in place
            blk = Vm[:, s:s + step]
            blk = blk if blk.dtype == wd else blk.to(wd)
            new = Yt @ blk
            self.V[:keep, s:s + step] = new
        # F Yk leaves span(Yk) only by the skew part (~ the products' rounding / sqrt(n/m))
        # and eigh's rounding; the rotated rows are rounded once: both in basis_rounding
        Fk = Yk.T @ self.F[:m, :m] @ Yk
        self.restarts += 1
        self.W_prev = None
        Hk = Yk.T @ self.H[:m, :m] @ Yk
        self.H.zero_()
        self.F.zero_()
        self.H[:keep, :keep] = 0.5 * (Hk + Hk.T)
        self.F[:keep, :keep] = Fk
        C = self.C[:m]
        self.C = C.new_zeros(self.mb, C.shape[1])
        self.C[:keep] = Yk.T @ C
        self.lo = 0
        self.m = keep

    def vectors(self, Ys: Tensor) -> Tensor:
        """Ritz vectors ``(V Ys)^T`` as rows ``[s, n]`` in ``wdtype``."""
        return rows_combine(Ys.T, self.V[:self.m], self.wdtype)

    def products(self, Ys: Tensor) -> Tensor:
        """``(A V Ys)^T`` from the relation (``[s, n]``, ``wdtype``; no product)."""
        m = self.m
        return rows_combine((self.F[:m, :m] @ Ys).T, self.V[:m], self.wdtype) + (self.C[:m].T @ Ys).T @ self.G

    def basis_rounding(self, anorm: Tensor) -> Tensor:
        """Modelled rounding of the relation itself: ``u_basis ||A|| sqrt(1 + restarts)``.

        Each stored row is rounded to the basis dtype (``<= u_basis`` relative) and each
        restart adds the rounding of ``eigh`` and of the rotated rows; independent
        errors in random directions, so they add up like a random walk.
        """
        return self.u_basis * anorm * math.sqrt(1 + self.restarts)

    def rounding(self, n: int, u_op: float, anorm: Tensor, systematic: float) -> Tensor:
        """Products' rounding from the skew samples (see :mod:`estimators._precision`), on the device."""
        floor = systematic * u_op * anorm
        if self.skew_count == 0:
            return floor
        return torch.maximum((n / 2 * self.skew_sq / self.skew_count).sqrt(), floor)
