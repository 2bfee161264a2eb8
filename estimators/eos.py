"""Reproduce the edge of stability (Cohen et al. 2021) on built-in problems, no downloads.

Two problems, both trained by full-batch gradient descent and tracked with
:class:`~estimators.monitor.SharpnessMonitor` against ``2/lr``:

* ``"tanh"`` (default): the toy of the official edge-of-stability code
  (``locuslab/edge-of-stability``, ``chebyshev-3-20`` + ``regression`` net): 20 points
  evenly spaced on ``[-1, 1]`` labelled by the Chebyshev polynomial ``T_3``, a
  ``1 -> 100 -> 1`` tanh network (first layer Xavier-normal with gain 1.9 and zero
  bias, second layer Xavier-normal without bias; 300 parameters), loss
  ``mean(1/2 (f - y)^2)``.  Sharpness rises (progressive sharpening) until it reaches
  ``2/lr`` and then hovers there while the loss keeps falling non-monotonically.
* ``"quadratic"``: a second-order regression model in the sense of Agarwala,
  Pedregosa and Pennington (2022): outputs quadratic in the parameters,
  ``z_i(theta) = J_i theta + 1/2 theta^T Q_i theta``, squared loss; the Hessian is
  explicit (:meth:`SecondOrderRegression.hessian`), so every tracked value can be
  checked against ``eigvalsh``.  Random ``J`` with singular values ``1/i`` (scaled so
  that ``lambda_max(J^T J / m) = 1``) and random symmetric ``Q_i``; GD sharpens to just
  below ``2/lr`` and converges there (the paper's "slightly off" edge of stability).

``run_edge_of_stability`` returns an :class:`EoSResults` (per learning rate: onset
step, the band min / median / max of sharpness/(2/lr) over the measurements after the
onset, whether sharpening preceded it, cost) and writes ``eos.png`` and ``eos.json``
into ``out_dir``.

Initialisation (``init``): ``"private"`` (default) draws the tanh net's weights from a
private generator (the global RNG is untouched); ``"authors"`` reproduces the official
code call by call -- ``torch.manual_seed(seed)``, the float32 ``nn.Linear`` constructors
(which consume the global RNG), then ``xavier_normal_`` with gain 1.9 / zero bias /
``xavier_normal_`` from the same global stream (``make_one_layer_network``), and the
float32 grid ``torch.linspace(-1, 1, 20)`` labelled in float32 -- then casts to
``dtype`` (float64 by default; the official runs train in float32 on a GPU).  The
global RNG state is restored afterwards.

Sampling: after the onset GD on this toy oscillates with period 2 along the top
eigenvector, and the sharpness measured at even and odd steps differs.  Measuring every
``every`` steps with ``every`` even samples one phase only and biases the median; the
full setting measures every step (``every = 1``; the fast one every 7th, an odd
interval, so both phases are sampled).  If measuring every step is too costly, use an
odd ``every`` (the phases alternate) or measure consecutive pairs.

``run_adam_edge_of_stability`` is the adaptive counterpart (Cohen et al. 2022): full-batch
Adam on the tanh problem, tracking the preconditioned sharpness
``lambda_max(P^{-1/2} H P^{-1/2})`` against ``(2 + 2 b1) / ((1 - b1) lr) = 38/lr``; it
writes ``eos_adam.png`` / ``eos_adam.json``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torch import Tensor, nn

from .monitor import SharpnessMonitor

__all__ = [
    "HalfMSELoss",
    "chebyshev_data",
    "tanh_regression_net",
    "SecondOrderRegression",
    "EoSRun",
    "EoSResults",
    "train_gd",
    "run_edge_of_stability",
    "run_adam_edge_of_stability",
    "post_onset_band",
    "DEFAULTS",
]


class HalfMSELoss(nn.Module):
    """``1/2 (z - y)^2`` averaged (``reduction="mean"``, over all entries) or summed."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
        self.reduction = reduction

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        sq = (z - y.reshape(z.shape)) ** 2
        return 0.5 * (sq.mean() if self.reduction == "mean" else sq.sum())


def chebyshev_data(n: int = 20, degree: int = 3, *, float32_grid: bool = False, dtype=torch.float64,
                   device="cpu") -> tuple[Tensor, Tensor]:
    """``n`` points evenly spaced on ``[-1, 1]`` (``[n, 1]``) with targets ``T_degree(x)`` (``[n, 1]``).

    ``float32_grid=True`` builds them as the official ``make_chebyshev_dataset`` does (a
    float32 ``torch.linspace``, targets rounded to float32) before casting to ``dtype``.
    """
    c = np.zeros(degree + 1)
    c[-1] = 1.0
    if float32_grid:
        x = torch.linspace(-1, 1, n, dtype=torch.float32).numpy()
        y = np.asarray(np.polynomial.chebyshev.chebval(x, c), dtype=np.float32)
    else:
        x = np.linspace(-1.0, 1.0, n)
        y = np.polynomial.chebyshev.chebval(x, c)
    X = torch.tensor(x, dtype=dtype, device=device).unsqueeze(1)
    return X, torch.tensor(y, dtype=dtype, device=device).unsqueeze(1)


def tanh_regression_net(width: int = 100, gain: float = 1.9, *, seed: int = 0, init: str = "private",
                        dtype=torch.float64, device="cpu") -> nn.Sequential:
    """``Linear(1, width) - Tanh - Linear(width, 1, bias=False)`` initialised as in the EoS code.

    First weight Xavier-normal with ``gain``, zero first bias, second weight Xavier-normal
    (gain 1).  ``init="private"``: drawn from a private generator.  ``init="authors"``:
    the official ``make_one_layer_network`` call by call (``torch.manual_seed(seed)``,
    float32 modules, the global stream), then cast to ``dtype``.  Either way the global
    RNG state is unchanged afterwards.
    """
    if init == "authors":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = nn.Sequential(nn.Linear(1, width, dtype=torch.float32), nn.Tanh(),
                                nn.Linear(width, 1, bias=False, dtype=torch.float32))
            with torch.no_grad():
                nn.init.xavier_normal_(net[0].weight, gain=gain)
                nn.init.zeros_(net[0].bias)
                nn.init.xavier_normal_(net[2].weight)
        return net.to(dtype=dtype, device=device)
    if init != "private":
        raise ValueError(f"Unknown init {init!r}; use 'private' or 'authors'.")
    with torch.random.fork_rng(devices=[]):
        net = nn.Sequential(nn.Linear(1, width), nn.Tanh(), nn.Linear(width, 1, bias=False))
    net = net.to(dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        nn.init.xavier_normal_(net[0].weight, gain=gain, generator=g)
        nn.init.zeros_(net[0].bias)
        nn.init.xavier_normal_(net[2].weight, generator=g)
    return net.to(device)


class SecondOrderRegression(nn.Module):
    """``z_i(theta) = J_i theta + 1/2 theta^T Q_i theta`` for ``m`` data points; parameter ``theta`` ``[d]``.

    The input is a tensor of data indices ``[B]`` (long); the output ``z[idx]`` ``[B, 1]``.
    With :class:`HalfMSELoss` (mean) the loss is ``1/(2m) sum_i (z_i - y_i)^2`` and its
    Hessian is explicit: ``(1/m) sum_i [(J_i + Q_i theta)(J_i + Q_i theta)^T + (z_i - y_i) Q_i]``.

    Args:
        num_data: ``m``.
        dim: ``d``.
        q_scale: size of the quadratic term (entries of ``Q_i`` ~ ``q_scale / sqrt(2 d)``).
        decay: singular values of ``J`` are ``sqrt(m) i^{-decay}``.
        seed: all random draws (private generator).
    """

    def __init__(self, num_data: int = 20, dim: int = 50, *, q_scale: float = 2.0, decay: float = 1.0,
                 seed: int = 0, dtype=torch.float64, device="cpu") -> None:
        super().__init__()
        m, d = int(num_data), int(dim)
        r = min(m, d)
        g = torch.Generator().manual_seed(seed)
        U, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
        s = torch.arange(1, r + 1, dtype=torch.float64) ** (-float(decay))
        J = math.sqrt(m) * (U * s) @ V.T
        A = torch.randn(m, d, d, generator=g, dtype=torch.float64)
        Q = q_scale * (A + A.transpose(1, 2)) / (2.0 * math.sqrt(d))
        y = torch.randn(m, generator=g, dtype=torch.float64)
        self.register_buffer("J", J.to(dtype=dtype, device=device))
        self.register_buffer("Q", Q.to(dtype=dtype, device=device))
        self.register_buffer("targets", y.to(dtype=dtype, device=device))
        self.theta = nn.Parameter(torch.zeros(d, dtype=dtype, device=device))

    def outputs(self) -> Tensor:
        """All ``m`` outputs ``[m]``."""
        th = self.theta
        return self.J @ th + 0.5 * torch.einsum("i,mij,j->m", th, self.Q, th)

    def forward(self, idx: Tensor) -> Tensor:
        return self.outputs()[idx].unsqueeze(-1)

    def data(self) -> tuple[Tensor, Tensor]:
        """The full batch ``(indices [m], targets [m, 1])``."""
        m = self.J.shape[0]
        return torch.arange(m, device=self.J.device), self.targets.unsqueeze(-1)

    @torch.no_grad()
    def hessian(self) -> Tensor:
        """Explicit ``[d, d]`` Hessian of the mean half-MSE loss at the current ``theta``."""
        th = self.theta.detach()
        Jt = self.J + torch.einsum("mij,j->mi", self.Q, th)
        r = self.outputs() - self.targets
        return (Jt.T @ Jt + torch.einsum("m,mij->ij", r, self.Q)) / self.J.shape[0]


# ------------------------------------------------------------------------ experiment
DEFAULTS = {
    # problem: (lrs, steps, every) full / fast
    "tanh": {"full": ((0.2, 0.25, 0.33, 0.4), 3000, 1), "fast": ((0.4,), 600, 7)},
    "quadratic": {"full": ((1.0, 1.2, 1.45), 300, 2), "fast": ((1.2,), 100, 2)},
}


@dataclass(frozen=True)
class EoSRun:
    """One learning rate.

    Attributes:
        lr: learning rate; ``threshold`` = ``2 / lr``.
        onset: step of the edge-of-stability onset (first sharpness >= 0.95 x 2/lr) or ``None``.
        median_ratio: median of sharpness / (2/lr) over the measurements from the onset on.
        min_ratio, max_ratio: the band's ends over the same measurements (``None``
            without an onset).  With ``every = 1`` these are all steps after the onset.
        progressive_sharpening: the monitor's rule (sharpness rose before the onset).
        initial_sharpness, max_sharpness, final_loss: as named.
        mean_matvecs: Hessian-vector products per measurement (warm-started Lanczos).
        exact_max_abs_error: ``max |tracked - eigvalsh(H)|`` over the measurements when
            the exact check was on (quadratic problem), else ``None``.
        diverged: training produced a non-finite loss.
        history: the monitor's records (as dictionaries).
    """

    lr: float
    threshold: float
    onset: int | None
    median_ratio: float | None
    progressive_sharpening: bool
    initial_sharpness: float
    max_sharpness: float
    final_loss: float
    mean_matvecs: float
    seconds: float
    exact_max_abs_error: float | None = None
    diverged: bool = False
    min_ratio: float | None = None
    max_ratio: float | None = None
    history: list[dict] = field(default_factory=list, repr=False)


def post_onset_band(monitor: SharpnessMonitor) -> tuple[float | None, float | None, float | None]:
    """``(min, median, max)`` of sharpness / threshold over the monitor's measurements from the onset on."""
    i = monitor.eos_onset_index
    if i is None:
        return None, None, None
    ratios = [r.ratio for r in monitor.history[i:] if r.ratio is not None]
    if not ratios:
        return None, None, None
    t = torch.tensor(ratios, dtype=torch.float64)
    return float(t.min()), float(t.median()), float(t.max())


@dataclass(frozen=True)
class EoSResults:
    """All runs of :func:`run_edge_of_stability` plus where the files went."""

    problem: str
    runs: list[EoSRun]
    png: str | None
    json: str | None

    def table(self) -> str:
        """A small text table, one line per learning rate (``thresh``: 2/lr for GD, 38/lr for Adam)."""
        lines = [f"{'lr':>6} {'thresh':>7} {'S_0':>7} {'S_max':>7} {'onset':>6} {'median S/thresh':>16} "
                 f"{'band min-max':>13} {'sharpening':>10} {'HVP/meas':>8} {'loss':>9}"]
        for r in self.runs:
            band = f"{r.min_ratio:.3f}-{r.max_ratio:.3f}" if r.min_ratio is not None else "-"
            lines.append(
                f"{r.lr:6.3g} {r.threshold:7.3f} {r.initial_sharpness:7.3f} {r.max_sharpness:7.3f} "
                f"{str(r.onset):>6} {('%.3f' % r.median_ratio) if r.median_ratio is not None else '-':>16} "
                f"{band:>13} {str(r.progressive_sharpening):>10} {r.mean_matvecs:8.1f} {r.final_loss:9.2e}"
            )
        return "\n".join(lines)


def train_gd(model: nn.Module, loss_fn, data, lr: float, steps: int, every: int, *, k: int = 1,
             tol: float = 1e-4, max_matvecs: int = 100, seed: int = 0,
             exact_hessian=None) -> tuple[SharpnessMonitor, list[float], bool]:
    """Full-batch GD (``torch.optim.SGD``) for ``steps`` steps, measuring every ``every`` steps.

    Args:
        exact_hessian: optional callable returning the dense Hessian at the current
            parameters; its top eigenvalue is recorded per measurement (for checks).

    Returns:
        ``(monitor, exact_top_eigenvalues, diverged)``.
    """
    X, y = data
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    mon = SharpnessMonitor(model, loss_fn, data, opt, every=every, k=k, tol=tol,
                           max_matvecs=max_matvecs, seed=seed)
    exact: list[float] = []

    def measure(t: int) -> None:
        if mon.step(t) is not None and exact_hessian is not None:
            exact.append(float(torch.linalg.eigvalsh(exact_hessian())[-1]))

    measure(0)
    for t in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(X), y)
        if not bool(torch.isfinite(loss)):
            return mon, exact, True
        loss.backward()
        opt.step()
        try:
            measure(t)
        except FloatingPointError:
            return mon, exact, True
    return mon, exact, False


def _make_problem(problem: str, seed: int, dtype, device, init: str = "private"):
    if problem == "tanh":
        model = tanh_regression_net(seed=seed, init=init, dtype=dtype, device=device)
        data = chebyshev_data(float32_grid=init == "authors", dtype=dtype, device=device)
        return model, HalfMSELoss(), data, None
    if problem == "quadratic":
        model = SecondOrderRegression(seed=seed, dtype=dtype, device=device)
        return model, HalfMSELoss(), model.data(), model.hessian
    raise ValueError(f"Unknown problem {problem!r}; use 'tanh' or 'quadratic'.")


def run_edge_of_stability(
    lrs=None,
    steps: int | None = None,
    every: int | None = None,
    out_dir: str | None = "out",
    fast: bool = False,
    seed: int = 0,
    *,
    problem: str = "tanh",
    dtype=torch.float64,
    device="cpu",
    k: int = 1,
    tol: float = 1e-4,
    max_matvecs: int = 100,
    filename: str = "eos",
    num_threads: int | None = 1,
    verbose: bool = False,
    init: str = "private",
) -> EoSResults:
    """Full-batch GD at several learning rates with sharpness tracked against ``2/lr``.

    Args:
        lrs: learning rates (default per problem, see :data:`DEFAULTS`: tanh
            ``(0.2, 0.25, 0.33, 0.4)``, 3000 steps, every step; ``fast``: ``(0.4,)``, 600
            steps, every 7th; quadratic ``(1.0, 1.2, 1.45)``, 300 steps, every 2).
        steps, every: training steps and measurement interval (defaults per problem;
            an even ``every`` sees one phase of a period-2 oscillation only, see the
            module docstring).
        out_dir: where ``{filename}.png`` and ``{filename}.json`` go (``None``: no files).
        fast: the cheap default setting (seconds).
        seed: model initialisation (and the monitor's generator).
        problem: ``"tanh"`` or ``"quadratic"``.
        dtype, device: of model and data (float64 default).
        k, tol, max_matvecs: monitor settings.
        filename: base name of the written files.
        num_threads: torch CPU threads during the run (restored afterwards); ``1`` is
            much faster for these tiny models on a busy machine (``None``: unchanged).
        verbose: print the table.
        init: ``"private"`` or ``"authors"`` (the official initialisation and float32
            grid; tanh problem only).

    Returns:
        :class:`EoSResults`.
    """
    if init not in ("private", "authors"):
        raise ValueError(f"Unknown init {init!r}; use 'private' or 'authors'.")
    if init == "authors" and problem != "tanh":
        raise ValueError("init='authors' is the official tanh-network initialisation; use problem='tanh'.")
    cfg = DEFAULTS.get(problem)
    if cfg is None:
        raise ValueError(f"Unknown problem {problem!r}; use 'tanh' or 'quadratic'.")
    d_lrs, d_steps, d_every = cfg["fast" if fast else "full"]
    lrs = tuple(float(a) for a in (d_lrs if lrs is None else lrs))
    steps = d_steps if steps is None else int(steps)
    every = d_every if every is None else int(every)
    if not lrs or any(not a > 0 for a in lrs):
        raise ValueError(f"lrs must be positive learning rates, got {lrs}.")
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    try:
        runs = _run_all(problem, lrs, steps, every, seed, dtype, device, k, tol, max_matvecs, init)
    finally:
        torch.set_num_threads(threads)
    res = EoSResults(problem=problem, runs=runs, png=None, json=None)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        png = os.path.join(out_dir, f"{filename}.png")
        js = os.path.join(out_dir, f"{filename}.json")
        _plot(res, png)
        with open(js, "w") as f:
            json.dump({"problem": problem, "steps": steps, "every": every, "seed": seed, "init": init,
                       "runs": [asdict(r) for r in runs]}, f, indent=1)
        res = replace(res, png=png, json=js)
    if verbose:
        print(res.table())
    return res


def _run_all(problem, lrs, steps, every, seed, dtype, device, k, tol, max_matvecs, init="private") -> list[EoSRun]:
    runs = []
    for lr in lrs:
        model, loss_fn, data, exact_h = _make_problem(problem, seed, dtype, device, init)
        t0 = time.perf_counter()
        mon, exact, diverged = train_gd(model, loss_fn, data, lr, steps, every, k=k, tol=tol,
                                        max_matvecs=max_matvecs, seed=seed, exact_hessian=exact_h)
        secs = time.perf_counter() - t0
        hist = mon.history
        s = [r.sharpness for r in hist]
        err = None
        if exact:
            err = max(abs(a - b) for a, b in zip(s, exact))
        summ = mon.summary()
        lo, _, hi = post_onset_band(mon)
        runs.append(EoSRun(
            lr=lr, threshold=2.0 / lr, onset=mon.eos_onset, median_ratio=mon.eos_ratio_median(),
            progressive_sharpening=mon.progressive_sharpening, initial_sharpness=s[0], max_sharpness=max(s),
            final_loss=hist[-1].loss, mean_matvecs=summ["mean_matvecs"], seconds=secs,
            exact_max_abs_error=err, diverged=diverged, min_ratio=lo, max_ratio=hi, history=mon.to_records(),
        ))
    return runs


def run_adam_edge_of_stability(
    lrs=(0.003, 0.01),
    steps: int = 2000,
    every: int = 50,
    out_dir: str | None = "out",
    fast: bool = False,
    seed: int = 0,
    *,
    dtype=torch.float64,
    device="cpu",
    tol: float = 1e-4,
    num_threads: int | None = 1,
    filename: str = "eos_adam",
) -> EoSResults:
    """Full-batch Adam (``b1 = 0.9``) on the tanh problem; preconditioned sharpness vs ``38/lr``.

    ``EoSRun`` fields refer to the *preconditioned* sharpness and its threshold
    (``threshold = 38/lr``, ``median_ratio`` = median of ``lambda_max(P^{-1}H) / (38/lr)``
    from the onset on); each history record also holds the raw sharpness, which keeps
    growing while the preconditioned one equilibrates.  ``fast``: ``lrs=(0.01,)``, 400
    steps, every 20.
    """
    if fast:
        lrs, steps, every = (0.01,), 400, 20
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    runs = []
    try:
        for lr in lrs:
            model, loss_fn, (X, y), _ = _make_problem("tanh", seed, dtype, device)
            opt = torch.optim.Adam(model.parameters(), lr=float(lr))
            mon = SharpnessMonitor(model, loss_fn, (X, y), opt, every=every, preconditioned=True, tol=tol,
                                   seed=seed)
            t0 = time.perf_counter()
            diverged = False
            for t in range(1, steps + 1):
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(X), y)
                if not bool(torch.isfinite(loss)):
                    diverged = True
                    break
                loss.backward()
                opt.step()
                mon.step(t)
            hist = mon.history
            pre = [r.preconditioned_sharpness for r in hist]
            runs.append(EoSRun(
                lr=float(lr), threshold=hist[0].preconditioned_threshold, onset=mon.eos_onset,
                median_ratio=mon.eos_ratio_median(), progressive_sharpening=mon.progressive_sharpening,
                initial_sharpness=pre[0], max_sharpness=max(pre), final_loss=hist[-1].loss,
                mean_matvecs=mon.summary()["mean_matvecs"], seconds=time.perf_counter() - t0,
                diverged=diverged, history=mon.to_records(),
            ))
    finally:
        torch.set_num_threads(threads)
    res = EoSResults(problem="tanh-adam", runs=runs, png=None, json=None)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        res = replace(res, png=os.path.join(out_dir, f"{filename}.png"),
                      json=os.path.join(out_dir, f"{filename}.json"))
        _plot_adam(res, res.png)
        with open(res.json, "w") as f:
            json.dump({"problem": "tanh-adam", "steps": steps, "every": every, "seed": seed,
                       "runs": [asdict(r) for r in runs]}, f, indent=1)
    return res


def _plot_adam(res: EoSResults, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(res.runs):
        c = colors[i % len(colors)]
        steps = [h["step"] for h in run.history]
        ax0.plot(steps, [h["sharpness"] for h in run.history], "o-", ms=2, lw=1, color=c, label=f"lr = {run.lr:g}")
        ax1.plot(steps, [h["preconditioned_sharpness"] for h in run.history], "o-", ms=2, lw=1, color=c,
                 label=f"lr = {run.lr:g}")
        ax1.axhline(run.threshold, color=c, ls="--", lw=1)
    ax0.set_ylabel("raw sharpness $\\lambda_{max}(H)$")
    ax0.legend(fontsize=8)
    ax0.set_title("Adaptive edge of stability, full-batch Adam on the tanh net")
    ax1.set_ylabel("$\\lambda_{max}(P^{-1}H)$  (dashed: 38/lr)")
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot(res: EoSResults, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(res.runs):
        c = colors[i % len(colors)]
        steps = [h["step"] for h in run.history]
        ax0.plot(steps, [h["loss"] for h in run.history], color=c, lw=1, label=f"lr = {run.lr:g}")
        ax1.plot(steps, [h["sharpness"] for h in run.history], "o-", ms=2, lw=1, color=c,
                 label=f"lr = {run.lr:g}")
        ax1.axhline(run.threshold, color=c, ls="--", lw=1)
        if run.onset is not None:
            ax1.axvline(run.onset, color=c, ls=":", lw=0.8)
    ax0.set_yscale("log")
    ax0.set_ylabel("train loss")
    ax0.legend(fontsize=8)
    ax1.set_ylabel("sharpness  (dashed: 2/lr)")
    ax1.set_xlabel("step")
    name = {"tanh": "1-100-1 tanh net on Chebyshev T3 (20 points)",
            "quadratic": "second-order regression model"}[res.problem]
    ax0.set_title(f"Edge of stability, full-batch GD: {name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

