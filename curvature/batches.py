"""How a batch becomes model inputs and a target, and a model output becomes a prediction.

The one data loop (:class:`curvature._empirical_risk.BatchLoop`) reads every batch through
a :class:`BatchAdapter`; operators never look at a batch's format themselves.  The
defaults fit plain PyTorch and Hugging Face ``transformers``:

=====================================  =====================================  ==================
batch                                  model called as                        target
=====================================  =====================================  ==================
``(X, y)`` (tuple or list)             ``model(X)``                           ``y``
``(X1, X2, ..., y)`` (3+ entries)      ``model(X1, X2, ...)``                 ``y`` (the last)
a Mapping (dict, ``BatchEncoding``)    ``model(**batch without "labels")``    ``batch["labels"]``
=====================================  =====================================  ==================

With ``pass_labels=True`` the ``labels`` entry is passed to the model too (a Hugging
Face model then also computes its own loss, which is ignored).  The prediction handed to
the loss is the output itself for a tensor, ``output.logits`` for an object with a
``logits`` attribute (Hugging Face ``ModelOutput``), ``output["logits"]`` for a Mapping,
and the first entry of a tuple/list.

``N`` (the batch size, used for example counts) is the first dimension of the target
when it is a tensor, else that of the first tensor among the inputs.

Override any part with callables::

    adapter = BatchAdapter(inputs=lambda b: ((b["image"],), {}),   # -> (args, kwargs)
                           target=lambda b: b["label"],
                           prediction=lambda out: out["scores"])
    H = HessianOperator(model, loss_fn, loader, adapter=adapter)

``inputs(batch)`` may return ``(args, kwargs)``, a tuple of positional inputs, a dict of
keyword inputs, or a single tensor.  Tensors nested in tuples, lists and Mappings are
moved to the parameters' device (:func:`to_device`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["BatchAdapter", "ModelInputs", "to_device", "tensor_leaves"]


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor nested in tuples, lists and Mappings moved to ``device``.

    Mappings come back as plain ``dict``; other objects are returned unchanged.  An
    inference tensor (created under ``torch.inference_mode()``) is cloned outside inference
    mode, so autograd can save it for backward (a batch is never differentiated itself).
    Cost: one copy per tensor not already on ``device`` (none otherwise).
    """
    if isinstance(obj, Tensor):
        t = obj.to(device, non_blocking=True)
        if t.is_inference() and not torch.is_inference_mode_enabled():
            t = t.clone()
        return t
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        moved = [to_device(v, device) for v in obj]
        return tuple(moved) if isinstance(obj, tuple) else moved
    return obj


def tensor_leaves(obj: Any) -> list[Tensor]:
    """Every tensor nested in ``obj`` (tuples, lists, Mappings), in a fixed order."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for k in obj for t in tensor_leaves(obj[k])]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in tensor_leaves(v)]
    return []


@dataclass
class ModelInputs:
    """The inputs of one model call: ``model(*args, **kwargs)``, with ``batch_size`` examples."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    batch_size: int = 0

    def call(self, model: nn.Module, tensors: Mapping[str, Tensor] | None = None):
        """The raw output of ``model`` on these inputs.

        With ``tensors`` (parameter / buffer name -> tensor) the model is evaluated with
        them through ``torch.func.functional_call`` (the model is not modified).
        """
        if tensors is None:
            return model(*self.args, **self.kwargs)
        return torch.func.functional_call(model, dict(tensors), self.args, self.kwargs)


def _default_prediction(output) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, Mapping):
        if isinstance(output.get("logits"), Tensor):
            return output["logits"]
        raise TypeError(
            f"The model returned a Mapping without a 'logits' tensor (keys {list(output)}); pass "
            "adapter=BatchAdapter(prediction=lambda out: ...) to say which entry the loss takes."
        )
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"Cannot take a prediction from a model output of type {type(output).__name__}: expected a tensor, "
        "an object with .logits, a Mapping with 'logits' or a tuple whose first entry is a tensor; pass "
        "adapter=BatchAdapter(prediction=lambda out: ...)."
    )


def _as_model_inputs(value) -> tuple[tuple, dict]:
    """Normalize what a user's ``inputs(batch)`` returned to ``(args, kwargs)``."""
    if isinstance(value, Tensor):
        return (value,), {}
    if isinstance(value, Mapping):
        return (), dict(value)
    if (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], (tuple, list))
            and isinstance(value[1], Mapping)):
        return tuple(value[0]), dict(value[1])
    if isinstance(value, (tuple, list)):
        return tuple(value), {}
    raise TypeError(
        f"adapter inputs(batch) returned {type(value).__name__}; return (args, kwargs), a tuple of "
        "positional inputs, a dict of keyword inputs or a tensor."
    )


class BatchAdapter:
    """Reads batches and model outputs (see the module docstring for the defaults).

    Args:
        inputs: ``batch -> (args, kwargs)`` (or a tuple / dict / tensor, see the module
            docstring); default: the rules in the table above.
        target: ``batch -> target`` handed to ``loss_fn(prediction, target)``.
        prediction: ``model output -> tensor`` handed to the loss.
        label_key: the target's key in Mapping batches (default ``"labels"``).
        pass_labels: also pass ``label_key`` to the model for Mapping batches (default
            ``False``: the model does not compute its own loss).

    Example:
        >>> batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        >>> inputs, y = BatchAdapter().split(batch)     # model(**inputs.kwargs), y = labels
    """

    def __init__(self, inputs: Callable | None = None, target: Callable | None = None,
                 prediction: Callable | None = None, *, label_key: str = "labels",
                 pass_labels: bool = False) -> None:
        for name, fn in (("inputs", inputs), ("target", target), ("prediction", prediction)):
            if fn is not None and not callable(fn):
                raise TypeError(f"BatchAdapter({name}=...) must be callable, got {type(fn).__name__}.")
        self._inputs = inputs
        self._target = target
        self._prediction = prediction
        self.label_key = label_key
        self.pass_labels = bool(pass_labels)

    def _default_split(self, batch) -> tuple[tuple, dict, Any]:
        if isinstance(batch, Mapping):
            if self.label_key not in batch:
                raise KeyError(
                    f"A Mapping batch has no {self.label_key!r} entry (keys {list(batch)}); the target is "
                    f"batch[{self.label_key!r}]: add it, or pass adapter=BatchAdapter(label_key=...) or target=."
                )
            kwargs = {k: v for k, v in batch.items() if self.pass_labels or k != self.label_key}
            return (), kwargs, batch[self.label_key]
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return tuple(batch[:-1]), {}, batch[-1]
        raise TypeError(
            f"Each batch must be a pair (X, y), a tuple (X1, ..., y) with the target last, or a Mapping with a "
            f"{self.label_key!r} entry; got {type(batch).__name__}"
            f"{' of length %d' % len(batch) if isinstance(batch, (tuple, list)) else ''}. "
            "For other formats pass adapter=BatchAdapter(inputs=..., target=...)."
        )

    def split(self, batch) -> tuple[ModelInputs, Any]:
        """``(ModelInputs, target)`` of a batch (tensors not moved)."""
        if self._inputs is None or self._target is None:
            args, kwargs, target = self._default_split(batch)
        if self._inputs is not None:
            args, kwargs = _as_model_inputs(self._inputs(batch))
        if self._target is not None:
            target = self._target(batch)
        return ModelInputs(args, kwargs, _batch_size(args, kwargs, target)), target

    def prediction(self, output) -> Tensor:
        """The tensor the loss takes, read from a model output."""
        if self._prediction is None:
            return _default_prediction(output)
        z = self._prediction(output)
        if not isinstance(z, Tensor):
            raise TypeError(f"adapter prediction(output) must return a tensor, got {type(z).__name__}.")
        return z


def _batch_size(args: tuple, kwargs: dict, target) -> int:
    """``N`` of a batch: the target's first dim, else the first tensor input's (0-dim: 1)."""
    for t in (target, *tensor_leaves((args, kwargs))):
        if isinstance(t, Tensor):
            return int(t.shape[0]) if t.dim() else 1
    raise TypeError("Cannot tell the batch size: neither the target nor any model input is a tensor.")
