"""torch.optim conventions shared by the toolkit's optimizers (private).

:class:`~solvers.Sophia`, :class:`~solvers.NewtonCG` and :class:`~solvers.GNSNewton`
are ``torch.optim.Optimizer`` subclasses that keep part of their configuration
(the model, the loss, the curvature estimator, counters) on the instance.  This
module makes them behave like the built-in optimizers:

* ``copy.deepcopy`` and ``pickle`` keep those attributes (torch's
  ``Optimizer.__getstate__`` keeps only ``defaults``, ``state`` and
  ``param_groups``), so a copy steps exactly like the original;
* a learning rate may be a Python number or a one-element real ``Tensor`` (as in
  torch.optim; the optimizers read its value at every step, so in-place changes
  by a scheduler take effect);
* empty parameter groups are refused when they are added, not at the first step;
* ``load_state_dict`` refuses a state dict whose per-parameter state does not fit
  the parameters' shapes (a state dict saved for a model of another size), before
  anything is loaded.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

__all__ = ["OptimizerConventions", "check_lr", "lr_value"]


def check_lr(lr: Any, *, allow_zero: bool) -> None:
    """Validate a learning rate: a finite number (or 1-element real tensor), ``> 0`` or ``>= 0``.

    Raises:
        TypeError: ``lr`` is neither a number nor a tensor (or is a bool).
        ValueError: a tensor with more than one element, a complex or integer tensor,
            a non-finite value, or a negative (``allow_zero``) / non-positive value.
    """
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got a tensor of shape {tuple(lr.shape)}.")
        if not lr.is_floating_point():
            raise ValueError(f"Tensor lr must have a real floating dtype, got {lr.dtype}.")
        value = float(lr.detach())
    elif isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"lr must be a number or a 1-element tensor, got {type(lr).__name__}.")
    else:
        value = float(lr)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"Invalid learning rate: {value!r} (must be a finite number {bound}).")


def lr_value(lr: float | Tensor) -> float:
    """The current value of a (possibly tensor) learning rate, as a Python float."""
    return float(lr.detach()) if isinstance(lr, Tensor) else float(lr)


class OptimizerConventions:
    """Mixin (before ``torch.optim.Optimizer`` in the bases) implementing the conventions above.

    Subclasses declare:

    * ``_instance_attributes``: names of instance attributes that belong to the
      optimizer's configuration or progress (kept by deepcopy/pickle);
    * ``_param_shaped_state``: per-parameter state keys that must have the
      parameter's shape;
    * ``_flat_state``: state keys holding a flat vector over all parameters
      (``[n]``, ``n`` = total number of entries), and ``num_params`` (an int) if
      the optimizer stores it;
    * ``_check_param_group(group)``: validation of one group's hyperparameters
      (called for every group added, constructor included).
    """

    _instance_attributes: tuple[str, ...] = ()
    _param_shaped_state: tuple[str, ...] = ()
    _flat_state: tuple[str, ...] = ()

    # ------------------------------------------------------------ copy / pickle
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self._instance_attributes if k in self.__dict__})
        return state

    # ------------------------------------------------------------ param groups
    def _check_param_group(self, group: dict) -> None:  # pragma: no cover - overridden
        pass

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group`` that refuses empty or invalid groups."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            if len(group["params"]) == 0:
                raise ValueError(
                    f"{type(self).__name__}: parameter group {len(self.param_groups) - 1} is empty; every "
                    "group needs at least one parameter (drop the empty group)."
                )
            self._check_param_group(group)
        except BaseException:
            self.param_groups.pop()
            raise

    # -------------------------------------------------------------- state dict
    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.Optimizer.load_state_dict``, refusing state saved for other parameter shapes."""
        self._check_loaded_shapes(state_dict)
        super().load_state_dict(state_dict)

    def _check_loaded_shapes(self, state_dict: dict) -> None:
        name = type(self).__name__
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)):
            return  # torch's own check names this mismatch
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in saved_groups for i in g["params"]]
        by_id = dict(zip(saved_ids, range(len(params))))
        n = sum(p.numel() for p in params)
        for key, st in state_dict.get("state", {}).items():
            if key not in by_id or not isinstance(st, dict):
                continue
            j = by_id[key]
            p = params[j]
            for k in self._param_shaped_state:
                v = st.get(k)
                if isinstance(v, Tensor) and tuple(v.shape) != tuple(p.shape):
                    raise ValueError(
                        f"{name}.load_state_dict: state {k!r} of parameter {j} has shape {tuple(v.shape)} but "
                        f"the parameter has shape {tuple(p.shape)}; the state dict was saved for a model of "
                        "another size. Load it into an optimizer over the same parameters."
                    )
            for k in self._flat_state:
                v = st.get(k)
                if isinstance(v, Tensor) and v.numel() != n:
                    raise ValueError(
                        f"{name}.load_state_dict: state {k!r} has {v.numel()} entries but the optimizer's "
                        f"parameters have {n}; the state dict was saved for a model of another size."
                    )
            saved_n = st.get("num_params")
            if isinstance(saved_n, int) and saved_n != n:
                raise ValueError(
                    f"{name}.load_state_dict: the state dict was saved for {saved_n} parameter entries but the "
                    f"optimizer holds {n}; it comes from a model of another size."
                )
