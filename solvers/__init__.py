"""Second-order optimizers and minimizers that take their curvature as a LinearOperator."""

from .curvature_estimators import DiagonalCurvatureEstimator, GNBEstimator, HutchinsonEstimator
from .sophia import Sophia, SophiaGRecipe, official_lr, official_param_groups
from .matrix_problems import (
    MatrixCompletionProblem,
    MatrixSensingProblem,
    low_rank_ground_truth,
    matrix_completion_problem,
    matrix_sensing_family,
    matrix_sensing_problem,
    small_random_init,
    spectral_init,
)
from .scaled_gd import (
    ScaledGD, ScaledGDResult, factored_gd, scaled_gd, scaled_gd_lockstep, scaled_gd_preconditioner,
)
from .newton_cg import NewtonCG
from .gns_newton import GNSNewton

__all__: list[str] = []
__all__ += ["Sophia", "SophiaGRecipe", "official_lr", "official_param_groups", "GNBEstimator", "HutchinsonEstimator", "DiagonalCurvatureEstimator"]
__all__ += ["ScaledGD", "ScaledGDResult", "scaled_gd", "factored_gd", "scaled_gd_lockstep", "scaled_gd_preconditioner",
            "MatrixSensingProblem", "MatrixCompletionProblem", "matrix_sensing_problem", "matrix_sensing_family",
            "matrix_completion_problem", "low_rank_ground_truth", "spectral_init", "small_random_init"]
__all__ += ["NewtonCG", "GNSNewton"]

from ._result import History, IterationInfo, OptimizeResult
from .cubic import (
    CubicStep, EigCubicSubproblem, LanczosCubicSubproblem, cubic_model, solve_cubic_subproblem,
    solve_cubic_subproblem_eig, solve_cubic_subproblem_lanczos,
)
from .cubic_newton import arc, cubic_newton
from .lazy_newton import lazy_cubic_newton, lazy_regularized_newton
from .gns import (
    GNSLinearSystem, Metric, RankOneOperator, gns, gns_gradient, gns_step, gradient_descent,
    super_universal_newton,
)
from .minimize import METHODS, minimize
from ._oracle import dense_hessian
from . import problems

__all__ += ["minimize", "METHODS", "OptimizeResult", "History", "IterationInfo", "problems"]
__all__ += ["cubic_newton", "arc", "lazy_cubic_newton", "lazy_regularized_newton", "gns", "gns_gradient",
            "super_universal_newton", "gradient_descent"]
__all__ += ["CubicStep", "EigCubicSubproblem", "LanczosCubicSubproblem", "cubic_model", "solve_cubic_subproblem",
            "solve_cubic_subproblem_eig", "solve_cubic_subproblem_lanczos"]
__all__ += ["GNSLinearSystem", "Metric", "RankOneOperator", "gns_step", "dense_hessian"]
