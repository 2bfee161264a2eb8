"""Curvature operators for PyTorch models and functions, behind one LinearOperator.

Everything that produces curvature returns a :class:`LinearOperator`; everything that
consumes curvature (``estimators``, ``solvers``) takes one.
"""

from .cg import CGResult, conjugate_gradient
from .function import FunctionHessianOperator
from .linear_operator import (
    ConvergenceWarning,
    IdentityOperator,
    InverseOperator,
    LinearOperator,
)
from .batches import BatchAdapter
from .params import flatten, unflatten
from .structured import (
    BlockDiagonalOperator,
    CallableOperator,
    DenseOperator,
    DiagonalOperator,
)
from . import losses
from .losses import MeanDenominatorError, TokenCrossEntropyLoss
from .backpack import ggn_diagonal, hessian_diagonal
from .kfac import kfac
from .kronecker import KFACOperator, KroneckerOperator
from .ekfac import EKFACBlock, EKFACOperator, ekfac
from .blocks import block_diagonal, parameter_groups
from .fisher import FisherOperator
from .ggn import GGNOperator
from .hessian import HessianOperator
from .finite_difference import FiniteDifferenceHessianOperator
from . import distributed

__version__ = "0.1.0"

__all__ = [
    "LinearOperator",
    "IdentityOperator",
    "InverseOperator",
    "DenseOperator",
    "DiagonalOperator",
    "BlockDiagonalOperator",
    "CallableOperator",
    "FunctionHessianOperator",
    "ConvergenceWarning",
    "CGResult",
    "conjugate_gradient",
    "BatchAdapter",
    "flatten",
    "unflatten",
    "HessianOperator",
    "FiniteDifferenceHessianOperator",
    "distributed",
    "GGNOperator",
    "FisherOperator",
    "block_diagonal",
    "parameter_groups",
    "losses",
    "TokenCrossEntropyLoss",
    "MeanDenominatorError",
    "ggn_diagonal",
    "hessian_diagonal",
    "kfac",
    "KroneckerOperator",
    "KFACOperator",
    "ekfac",
    "EKFACOperator",
    "EKFACBlock",
]
