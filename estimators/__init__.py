"""Randomized and Krylov estimators of curvature: traces, diagonals, eigenvalues, densities.

Every estimator is a function of a ``curvature.LinearOperator`` and nothing else.
"""

__all__: list[str] = []
