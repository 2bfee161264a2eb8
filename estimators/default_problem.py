"""The built-in problem of ``python -m curvature spectrum``: a briefly trained small MLP.

A Gaussian-mixture classification task (``C`` well separated classes in ``d``
dimensions with a fraction of flipped labels, so the loss cannot reach zero), an MLP
with two ``tanh`` hidden layers, trained full-batch with Adam for a few hundred steps
(well under a second on one CPU core when the machine is idle).  At the end of training
the loss Hessian has the shape known from real networks (Sagun et al. 2017; Papyan
2019; Ghorbani et al. 2019): a bulk of eigenvalues near zero (median ``|lambda|`` about
5e-4 of the largest; a third of them slightly negative, down to -0.6% of the largest)
and a few outliers far above it (about two dozen of the 676 eigenvalues exceed 0.1,
the largest is 2.89 with the defaults; checked against the dense Hessian in
``tests/test_report.py``, slow mark).
The data, the initialization and the training are fully determined by ``seed``.

Nothing is downloaded; the problem is generated in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["DefaultProblem", "default_problem", "gaussian_mixture"]


@dataclass(frozen=True)
class DefaultProblem:
    """What :func:`default_problem` returns.

    Attributes:
        model: the trained ``nn.Sequential`` MLP (in eval mode).
        loss_fn: ``nn.CrossEntropyLoss()`` (mean reduction).
        data: one batch ``(X, y)``: ``X`` ``[N, d]`` float, ``y`` ``[N]`` int64.
        description: a one-line description of the problem (for reports).
        train_loss: the full-batch loss after training.
        train_accuracy: the accuracy on the (noisy) training labels.
    """

    model: nn.Module
    loss_fn: nn.Module
    data: tuple[Tensor, Tensor]
    description: str
    train_loss: float
    train_accuracy: float

    def __iter__(self):
        """Unpack as ``model, loss_fn, data`` (the ``--model`` factory convention)."""
        return iter((self.model, self.loss_fn, self.data))


def gaussian_mixture(
    num_samples: int = 2000,
    num_classes: int = 4,
    dim: int = 20,
    *,
    separation: float = 3.0,
    label_noise: float = 0.1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """A Gaussian-mixture classification data set.

    Class means are ``separation * N(0, I_dim)``; every point is its class mean plus
    ``N(0, I_dim)`` noise; then a fraction ``label_noise`` of the labels is redrawn
    uniformly (so the classes are not perfectly separable and the loss stays positive).

    Args:
        num_samples: ``N``.
        num_classes: ``C``.
        dim: ``d``.
        separation: scale of the class means relative to the unit within-class noise.
        label_noise: fraction of labels redrawn uniformly at random, in ``[0, 1]``.
        seed: seeds a private ``torch.Generator`` (the global RNG is untouched).
        dtype: dtype of ``X``.
        device: device of ``X`` and ``y``.

    Returns:
        ``(X, y)`` with ``X`` ``[N, d]`` of ``dtype`` and ``y`` ``[N]`` int64.
    """
    if num_samples < 1 or num_classes < 2 or dim < 1:
        raise ValueError(
            f"Need num_samples >= 1, num_classes >= 2, dim >= 1; got {num_samples}, "
            f"{num_classes}, {dim}."
        )
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must lie in [0, 1], got {label_noise}.")
    g = torch.Generator().manual_seed(int(seed))  # CPU generator: same data on every device
    means = separation * torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    y = torch.randint(0, num_classes, (num_samples,), generator=g)
    X = means[y] + torch.randn(num_samples, dim, generator=g, dtype=torch.float64)
    flip = torch.rand(num_samples, generator=g) < label_noise
    y = torch.where(flip, torch.randint(0, num_classes, (num_samples,), generator=g), y)
    return X.to(device=device, dtype=dtype), y.to(device)


def default_problem(
    *,
    num_samples: int = 2000,
    num_classes: int = 4,
    dim: int = 20,
    hidden: int = 16,
    steps: int = 200,
    lr: float = 1e-2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> DefaultProblem:
    """Build and briefly train the default problem of the spectrum report.

    Args:
        num_samples, num_classes, dim: the data set (see :func:`gaussian_mixture`).
        hidden: width of both hidden layers of the MLP ``d -> h -> h -> C`` (``tanh``).
        steps: full-batch Adam steps.
        lr: Adam learning rate.
        seed: seeds the data, the initialization (through ``torch.random.fork_rng``,
            so the caller's global RNG state is restored afterwards) and hence the
            whole training run.
        dtype, device: of the model and the data.  For float16/bfloat16 the model is
            trained in float32 (Adam's ``eps = 1e-8`` underflows to 0 in float16 and its
            first step divides 0 by 0) and converted to ``dtype`` afterwards.

    Returns:
        A :class:`DefaultProblem` (unpacks as ``model, loss_fn, data``).

    Cost: ``steps`` forward/backward passes on ``N`` points (about 0.3 s on one
    idle CPU core with the defaults: ``n = 676`` parameters).
    """
    train_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    X, y = gaussian_mixture(num_samples, num_classes, dim, seed=seed, dtype=train_dtype, device=device)
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        model = nn.Sequential(
            nn.Linear(dim, hidden), nn.Tanh(),
            nn.Linear(hidden, hidden), nn.Tanh(),
            nn.Linear(hidden, num_classes),
        ).to(device=device, dtype=train_dtype)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(int(steps)):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    model.to(dtype=dtype)
    X = X.to(dtype)
    with torch.no_grad():
        logits = model(X)
        loss = float(loss_fn(logits, y))
        acc = float((logits.argmax(1) == y).to(torch.float64).mean())
    n = sum(p.numel() for p in model.parameters())
    desc = (
        f"MLP {dim}-{hidden}-{hidden}-{num_classes} (tanh, {n} parameters) trained {steps} "
        f"Adam steps (lr {lr}) on a {num_classes}-class Gaussian mixture (N={num_samples}, "
        f"d={dim}, 10% label noise); train loss {loss:.4f}, accuracy {acc:.3f}"
    )
    return DefaultProblem(model, loss_fn, (X, y), desc, loss, acc)
