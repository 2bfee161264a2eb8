"""Drop-in facades with the interfaces of other libraries, over this toolkit's operators.

* :mod:`estimators.compat.pyhessian`: ``hessian(model, criterion, data=...)`` with
  PyHessian 0.1's ``eigenvalues()``, ``trace()`` and ``density()``.

They live under ``estimators`` (not ``curvature.compat``) because they use the
estimators, and ``curvature`` never imports ``estimators``.
"""

__all__ = ["pyhessian"]
