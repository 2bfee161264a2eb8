"""Dense symmetric operators with prescribed spectra, for estimator tests.

``operator_with_spectrum(lam, seed)`` returns ``DenseOperator(Q diag(lam) Q^T)`` with a
Haar-random orthogonal ``Q`` (QR of a Gaussian matrix with the sign fix), so the exact
eigenvalues, eigenvectors, trace and diagonal are known.  ``paper_spectrum(name, n)``
gives the six test spectra of Epperly, Tropp & Webber (XTrace, SIMAX 2024, Fig. 1/3).
"""

from __future__ import annotations

import torch

from curvature import DenseOperator

__all__ = ["haar_orthogonal", "operator_with_spectrum", "paper_spectrum", "PAPER_SPECTRA"]

PAPER_SPECTRA = ("flat", "poly", "slowexp", "fastexp", "smallstep", "bigstep")


def haar_orthogonal(n: int, seed: int = 0, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """A Haar-distributed ``[n, n]`` orthogonal matrix (QR with sign correction)."""
    g = torch.Generator(device=device).manual_seed(seed)
    Z = torch.randn(n, n, generator=g, dtype=dtype, device=device)
    Q, R = torch.linalg.qr(Z)
    return Q * torch.sign(torch.diagonal(R)).unsqueeze(0)


def operator_with_spectrum(lam, seed: int = 0, dtype=torch.float64, device="cpu"):
    """``(DenseOperator(Q diag(lam) Q^T), Q)`` for eigenvalues ``lam`` (any order)."""
    lam = torch.as_tensor(lam, dtype=dtype, device=device)
    Q = haar_orthogonal(lam.numel(), seed, dtype, device)
    A = (Q * lam) @ Q.T
    A = 0.5 * (A + A.T)
    return DenseOperator(A, is_symmetric=True), Q


def paper_spectrum(name: str, n: int = 1000, dtype=torch.float64) -> torch.Tensor:
    """The XTrace paper's test spectra (``tests/basic_tests.m``): eigenvalues ``[n]``."""
    i = torch.arange(1, n + 1, dtype=dtype)
    if name == "flat":
        return torch.linspace(1, 3, n, dtype=dtype)
    if name == "poly":
        return i ** -2.0
    if name == "slowexp":
        return 0.9 ** i
    if name == "fastexp":
        return 0.7 ** i
    if name in ("smallstep", "bigstep"):
        small = 1e-3 if name == "smallstep" else 1e-8
        lam = torch.full((n,), small, dtype=dtype)
        lam[: n // 20] = 1.0
        return lam
    raise ValueError(f"Unknown spectrum {name!r}; use one of {PAPER_SPECTRA}.")


