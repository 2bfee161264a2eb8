"""The Hessian-spectrum report: top eigenvalues, trace with error bar, density, plot, JSON.

:func:`spectrum_report` is what ``python -m curvature spectrum`` runs, usable from
Python on any ``(model, loss_fn, data)``::

    from estimators import spectrum_report
    rep = spectrum_report(model, loss_fn, loader, top_k=10, out_dir="spectrum_report")
    print(rep.summary())               # the table the command prints
    rep.eigenvalues, rep.trace, rep.trace_std_error, rep.density

It computes, on one curvature operator (Hessian, GGN, or a Fisher; optionally a subset
of the parameters):

* the ``top_k`` largest *algebraic* eigenvalues by thick-restart Lanczos
  (:func:`~estimators.top_eigenvalues`, ``which="LA"``), with residual norms;
* the trace with a standard error (Hutch++ by default: unbiased for any symmetric
  matrix, and its error bar is the Hutchinson standard error of the deflated
  remainder, so a spectrum with outliers gets a small, honest error bar); when the
  operator is no larger than the probe budget the trace is computed exactly from
  ``n`` unit-vector products instead (cheaper than estimating it), with error 0;
* the spectral density by stochastic Lanczos quadrature
  (:func:`~estimators.spectral_density`), whose extreme Ritz values also bracket the
  spectrum (the smallest one estimates the most negative eigenvalue);
* optionally, per layer (``per_layer=True``), the top eigenvalue and the trace of each
  diagonal block (:func:`curvature.block_diagonal`, grouping by owning module);

and writes ``out_dir/spectrum.png`` (density on a log axis, top eigenvalues marked)
and ``out_dir/summary.json`` (every number above, residuals, products spent per stage,
seeds, wall times, a description of the model and data).

Randomness: every stage takes its own seed derived from ``seed`` (eigen: ``seed``,
trace: ``seed + 1``, density: ``seed + 2``, Monte-Carlo Fisher labels: ``seed``), all
recorded in the JSON; the same call reproduces the same numbers on the same device.
"""

from __future__ import annotations

import dataclasses

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import curvature
from curvature import CallableOperator, LinearOperator

from ._validate import SEED_RANGE, check_int, check_seed, check_tolerance
from .density import spectral_density
from .eigen import top_eigenvalues
from .results import EigenResult
from .trace import hutchinson_trace, hutchpp_trace, xtrace

__all__ = ["spectrum_report", "SpectrumReport", "LayerSummary", "OPERATORS", "TRACE_METHODS"]

#: Operator names accepted by ``operator=`` and what they build.
OPERATORS = ("hessian", "ggn", "fisher-mc", "fisher-empirical", "fisher-exact")
#: Trace estimators accepted by ``trace_method=``.
TRACE_METHODS = ("hutch++", "hutchinson", "xtrace")


@dataclass(frozen=True)
class LayerSummary:
    """One row of the per-layer table (one diagonal block of the curvature).

    Attributes:
        name: the module owning the parameters (``"0"``, ``"encoder.fc1"``, ...).
        num_params: size of the block.
        top_eigenvalue: its largest algebraic eigenvalue.
        residual: the Lanczos residual norm of that eigenpair.
        trace: the block's trace (exact when ``trace_method == "exact"``).
        trace_std_error: standard error of ``trace`` (0 when exact).
        trace_method: ``"exact"`` or the estimator's name.
        num_matvecs: products with the block spent on this row.
    """

    name: str
    num_params: int
    top_eigenvalue: float
    residual: float
    trace: float
    trace_std_error: float
    trace_method: str
    num_matvecs: int


@dataclass(frozen=True)
class SpectrumReport:
    """What :func:`spectrum_report` computed (``to_dict()`` is the JSON summary).

    Attributes:
        operator: ``"hessian"``, ``"ggn"``, ``"fisher-mc"``, ...
        num_params: dimension ``n`` of the operator.
        param_names: the parameters it is over, in order.
        eigenvalues: the ``top_k`` largest algebraic eigenvalues, descending.
        residuals: ``||A x_i - theta_i x_i||`` per eigenpair.
        error_bounds: bounds on each eigenvalue's error (``min(r, r^2/gap)``).
        converged: per eigenpair, whether the residual met ``tol``.
        trace, trace_std_error, trace_method, trace_num_probes: the trace estimate.
        density: the :class:`~estimators.SpectralDensity` (nodes and weights per probe).
        layers: per-layer rows (``None`` unless ``per_layer=True``).
        num_matvecs: operator products per stage and ``"total"``.
        seeds: the seed of every random stage.
        wall_time_s: seconds per stage and ``"total"``.
        model: description of the model, data, dtype, device.
        settings: the arguments the report ran with.
        files: paths written (``"png"``, ``"json"``), empty if ``out_dir`` was ``None``.
    """

    operator: str
    num_params: int
    param_names: list[str]
    eigenvalues: list[float]
    residuals: list[float]
    error_bounds: list[float]
    converged: list[bool]
    trace: float
    trace_std_error: float
    trace_method: str
    trace_num_probes: int
    density: Any
    layers: list[LayerSummary] | None
    num_matvecs: dict[str, int]
    seeds: dict[str, int]
    wall_time_s: dict[str, float]
    model: dict[str, Any]
    settings: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)

    @property
    def spectrum_range(self) -> tuple[float, float]:
        """Smallest and largest SLQ Ritz values: a bracket estimate of the spectrum."""
        nodes, w = self.density.nodes, self.density.weights
        nodes = nodes[w > 0] if bool((w > 0).any()) else nodes.reshape(-1)
        return float(nodes.min()), float(nodes.max())

    def to_dict(self) -> dict[str, Any]:
        """The JSON summary as a plain dictionary."""
        d = self.density
        lo, hi = self.spectrum_range
        return {
            "operator": self.operator,
            "num_params": self.num_params,
            "param_names": self.param_names,
            "top_eigenvalues": {
                "which": "LA (largest algebraic)",
                "eigenvalues": self.eigenvalues,
                "residuals": self.residuals,
                "error_bounds": self.error_bounds,
                "converged": self.converged,
            },
            "trace": {
                "estimate": self.trace,
                "std_error": self.trace_std_error,
                "method": self.trace_method,
                "num_probes": self.trace_num_probes,
            },
            "density": {
                "method": "stochastic Lanczos quadrature",
                "num_probes": d.num_probes,
                "num_steps": int(d.nodes.shape[1]),
                "sigma": d.default_sigma(),
                "ritz_min": lo,
                "ritz_max": hi,
                "nodes": d.nodes.detach().cpu().double().tolist(),
                "weights": d.weights.detach().cpu().double().tolist(),
            },
            "per_layer": None if self.layers is None else [vars(r) for r in self.layers],
            "num_matvecs": self.num_matvecs,
            "seeds": self.seeds,
            "wall_time_s": self.wall_time_s,
            "model": self.model,
            "settings": self.settings,
            "files": self.files,
            "versions": {"torch": torch.__version__, "curvature": curvature.__version__},
        }

    def summary(self) -> str:
        """The human-readable table ``python -m curvature spectrum`` prints."""
        m = self.model
        lines = [
            f"{_OPERATOR_TITLES[self.operator]} spectrum of: {m['description']}",
            f"n = {self.num_params} parameters, N = {m['num_examples']} examples in "
            f"{m['num_batches']} batch(es), {m['dtype']} on {m['device']}",
            "",
            f"top-{len(self.eigenvalues)} eigenvalues (Lanczos, largest algebraic):",
            "   #     eigenvalue      residual",
        ]
        for i, (ev, r) in enumerate(zip(self.eigenvalues, self.residuals), 1):
            lines.append(f"  {i:2d}  {ev:13.6g}  {r:12.2e}")
        pm = "" if self.trace_method == "exact" else f" +- {self.trace_std_error:.4g} (1 s.e.)"
        lines.append(f"trace = {self.trace:.6g}{pm}   [{self.trace_method}, "
                     f"{self.num_matvecs['trace']} products]")
        lo, hi = self.spectrum_range
        d = self.density
        lines.append(f"density: SLQ with {d.num_probes} probes x {d.nodes.shape[1]} Lanczos steps; "
                     f"Ritz values span [{lo:.4g}, {hi:.4g}]")
        if self.layers is not None:
            lines += ["", "per layer (diagonal blocks):",
                      f"  {'layer':<24} {'params':>7}  {'top eigenvalue':>14}  {'trace':>12}  {'+- s.e.':>9}"]
            for r in self.layers:
                se = "exact" if r.trace_method == "exact" else f"{r.trace_std_error:.3g}"
                lines.append(f"  {r.name:<24} {r.num_params:>7d}  {r.top_eigenvalue:14.6g}  "
                             f"{r.trace:12.6g}  {se:>9}")
        nm = self.num_matvecs
        stages = ", ".join(f"{k} {v}" for k, v in nm.items() if k != "total")
        lines += ["", f"products: {stages}; total {nm['total']}    wall time {self.wall_time_s['total']:.1f} s"]
        if self.files:
            lines.append("wrote " + ", ".join(self.files.values()))
        return "\n".join(lines)


_OPERATOR_TITLES = {
    "hessian": "Hessian",
    "ggn": "Generalized Gauss-Newton",
    "fisher-mc": "Fisher (Monte-Carlo labels)",
    "fisher-empirical": "Empirical Fisher",
    "fisher-exact": "Fisher (exact)",
}


# ----------------------------------------------------------------------------- helpers
def select_params(model: nn.Module, params) -> list[str]:
    """Names of the parameters the report is over.

    Args:
        model: the model.
        params: ``None`` (all trainable parameters), a regular expression matched with
            ``re.search`` against the names of ``model.named_parameters()`` (trainable
            ones only), or a list of names.

    Raises:
        ValueError: a bad regular expression, or one that matches no trainable parameter.
    """
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        if not trainable:
            raise ValueError("The model has no trainable parameters (all have requires_grad=False).")
        return trainable
    if isinstance(params, str):
        try:
            pattern = re.compile(params)
        except re.error as exc:
            raise ValueError(f"params={params!r} is not a valid regular expression: {exc}.") from exc
        chosen = [n for n in trainable if pattern.search(n)]
        if not chosen:
            raise ValueError(
                f"params={params!r} matches no trainable parameter; the names are {trainable}."
            )
        return chosen
    return list(params)


def build_operator(operator: str, model: nn.Module, loss_fn, data, params, *, seed: int,
                   per_layer: bool = False, process_group=None) -> LinearOperator:
    """The curvature operator (or its per-layer block-diagonal version) named ``operator``."""
    if operator not in OPERATORS:
        raise ValueError(f"Unknown operator {operator!r}; choose one of {OPERATORS}.")
    if operator == "hessian":
        cls, kw = curvature.HessianOperator, {}
    elif operator == "ggn":
        cls, kw = curvature.GGNOperator, {}
    else:
        cls, kw = curvature.FisherOperator, {"kind": operator.split("-", 1)[1]}
        if kw["kind"] == "mc":
            kw["seed"] = seed
    kw["process_group"] = process_group  # data parallel: see curvature.distributed
    if per_layer:
        return curvature.block_diagonal(cls, model, loss_fn, data, params=params, grouping="layer", **kw)
    return cls(model, loss_fn, data, params=params, **kw)


def _data_size(data) -> tuple[int, int]:
    """``(examples, batches)`` of one batch ``(X, y)`` or an iterable of batches."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        return int(data[0].shape[0]), 1
    n = b = 0
    for X, _ in data:
        n += int(X.shape[0])
        b += 1
    return n, b


class _Progress:
    """A tqdm bar counting operator products (disabled when ``enabled`` is False)."""

    def __init__(self, enabled: bool | None) -> None:
        self.enabled = enabled
        self.bar = None

    def stage(self, desc: str, total: int | None):
        from tqdm.auto import tqdm

        self.close()
        self.bar = tqdm(total=total, desc=desc, unit="product", leave=False,
                        disable=(None if self.enabled is None else not self.enabled), dynamic_ncols=True)

    def update(self, k: int) -> None:
        if self.bar is not None:
            self.bar.update(k)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def wrap(self, op: LinearOperator) -> LinearOperator:
        """``op`` with every product reported to the bar (a lazy pass-through)."""

        def matmat(X: Tensor) -> Tensor:
            Y = op.matmat(X)
            self.update(X.shape[1])
            return Y

        return CallableOperator(matmat, op.shape, dtype=op.dtype, device=op.device,
                                is_symmetric=op.is_symmetric, param_shapes=op.param_shapes)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _trace(op: LinearOperator, num_probes: int, method: str, seed: int) -> tuple[float, float, str, int]:
    """``(estimate, std_error, method, products)``: exact when ``n <= num_probes``."""
    n = op.shape[0]
    before = op.num_matvecs
    if n <= num_probes:
        # n unit-vector products give the exact trace; estimating would cost as much.
        est = float(op.diagonal().sum())
        return est, 0.0, "exact", op.num_matvecs - before
    fn = {"hutchinson": hutchinson_trace, "hutch++": hutchpp_trace, "xtrace": xtrace}[method]
    res = fn(op, num_probes, seed=seed)
    return float(res.estimate), float(res.std_error), res.method, op.num_matvecs - before


def _top_eig(op: LinearOperator, k: int, tol: float | None, seed: int) -> EigenResult:
    return top_eigenvalues(op, k, which="LA", tol=tol, seed=seed)


# ------------------------------------------------------------------------------ plot
def save_spectrum_plot(report: SpectrumReport, path: str | os.PathLike) -> None:
    """Write the density (log y-axis) with the top eigenvalues marked to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    report.density.plot(ax, color="tab:blue", lw=1.2, label="SLQ density (Gaussian-smoothed)")
    for i, ev in enumerate(report.eigenvalues):
        ax.axvline(ev, color="tab:red", lw=0.9, alpha=0.75, ls="--",
                   label=f"top-{len(report.eigenvalues)} eigenvalues (Lanczos)" if i == 0 else None)
    pm = "" if report.trace_method == "exact" else f" ± {report.trace_std_error:.3g}"
    ax.set_title(f"{_OPERATOR_TITLES[report.operator]} spectrum, n = {report.num_params}: "
                 f"λmax = {report.eigenvalues[0]:.4g}, trace = {report.trace:.4g}{pm}", fontsize=10)
    ax.legend(loc="upper center", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- report
def spectrum_report(
    model: nn.Module,
    loss_fn,
    data,
    *,
    operator: str = "hessian",
    params: str | list[str] | None = None,
    top_k: int = 10,
    num_probes: int = 64,
    trace_method: str = "hutch++",
    slq_probes: int = 8,
    lanczos_steps: int = 80,
    tol: float | None = None,
    per_layer: bool = False,
    seed: int = 0,
    out_dir: str | os.PathLike | None = "spectrum_report",
    description: str | None = None,
    progress: bool | None = None,
    process_group=None,
) -> SpectrumReport:
    """Top eigenvalues, trace (with error bar) and spectral density of a model's curvature.

    Args:
        model: a ``torch.nn.Module``; evaluated in eval mode, its mode left unchanged.
        loss_fn: ``loss_fn(model(X), y)`` returning a scalar (mean or sum reduction).
        data: one batch ``(X, y)`` or a re-iterable of batches (a DataLoader without
            random augmentation); the curvature is of the loss over all of it.
        operator: ``"hessian"`` (default), ``"ggn"``, ``"fisher-mc"`` (labels sampled
            from the model, seeded), ``"fisher-empirical"`` or ``"fisher-exact"``.
        params: parameters to include: ``None`` (all trainable), a regular expression
            searched in the parameter names (``"fc2"``, ``r"\\.weight$"``), or a list of names.
        top_k: number of largest algebraic eigenvalues (capped at ``n``).
        num_probes: trace budget: test vectors of the trace estimator (Hutch++ spends
            them as ``num_probes`` products); the trace is exact if ``n <= num_probes``.
        trace_method: ``"hutch++"`` (default), ``"hutchinson"`` or ``"xtrace"``.
        slq_probes: probes of the stochastic Lanczos quadrature.
        lanczos_steps: Lanczos steps per SLQ probe (capped at ``n``).
        tol: relative residual tolerance of the top eigenpairs (default by dtype: 1e-6 float64,
            1e-5 float32, 3e-2 in 16 bits).
        per_layer: also compute each layer block's top eigenvalue and trace.
        seed: base seed (see the module docstring for the per-stage seeds).
        out_dir: directory for ``spectrum.png`` and ``summary.json`` (created);
            ``None`` writes nothing.
        description: one line describing the model in the outputs (default: the
            model's class and parameter count).
        progress: show tqdm progress bars (``None``: only on a terminal).
        process_group: data parallel (``torch.distributed``): every rank of the group
            holds a shard of ``data`` and calls this function; the numbers are those of
            the whole data set, identical on every rank, and only rank 0 writes
            ``out_dir`` (see :mod:`curvature.distributed`).

    Returns:
        A :class:`SpectrumReport`.

    Cost (products of the operator): the Lanczos products of ``top_k`` pairs (typically
    ``3-10 x top_k``), ``num_probes`` (trace; ``n`` if exact), ``slq_probes x
    lanczos_steps`` (density); per layer the same eigen and trace work per block.

    Raises:
        ValueError: unknown ``operator``/``trace_method``, non-positive counts, a
            ``params`` pattern that matches nothing, bad data (from the operator).
        TypeError: ``model`` is not an ``nn.Module`` or ``loss_fn`` is not callable.
    """
    t_start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(output, target), got {type(loss_fn).__name__}.")
    if data is None:
        raise ValueError("data is None: pass one batch (X, y) or an iterable of batches.")
    if operator not in OPERATORS:
        raise ValueError(f"Unknown operator {operator!r}; choose one of {OPERATORS}.")
    if trace_method not in TRACE_METHODS:
        raise ValueError(f"Unknown trace_method {trace_method!r}; choose one of {TRACE_METHODS}.")
    top_k, num_probes = check_int(top_k, "top_k"), check_int(num_probes, "num_probes")
    slq_probes, lanczos_steps = check_int(slq_probes, "slq_probes"), check_int(lanczos_steps, "lanczos_steps")
    if tol is not None:
        tol = check_tolerance(tol, "tol")
    min_probes = {"hutchinson": 2, "hutch++": 4, "xtrace": 4}[trace_method]
    if int(num_probes) < min_probes:
        raise ValueError(f"num_probes must be >= {min_probes} for trace_method={trace_method!r} "
                         f"(a standard error needs at least two samples), got {num_probes}.")
    seed = check_seed(seed)
    if seed + 2 > SEED_RANGE[1]:
        raise ValueError(f"seed must be <= 2**64 - 3 (the density stage uses seed + 2), got {seed}.")
    seeds = {"eigen": seed, "trace": seed + 1, "density": seed + 2}
    if operator == "fisher-mc":
        seeds["fisher_mc_labels"] = seed
    names = select_params(model, params)
    bar = _Progress(progress)
    nm: dict[str, int] = {}
    wall: dict[str, float] = {}

    try:
        t0 = time.perf_counter()
        base = build_operator(operator, model, loss_fn, data, names, seed=seed, process_group=process_group)
        op = bar.wrap(base)
        n = op.shape[0]
        device = op.device
        wall["setup"] = time.perf_counter() - t0

        # ---- top eigenvalues
        t0 = time.perf_counter()
        k = min(int(top_k), n)
        bar.stage(f"top-{k} eigenvalues", None)
        eig = _top_eig(op, k, tol, seeds["eigen"])
        nm["eigen"] = eig.num_matvecs
        _sync(device)
        wall["eigen"] = time.perf_counter() - t0

        # ---- trace
        t0 = time.perf_counter()
        bar.stage("trace", min(n, int(num_probes)))
        tr, tr_se, tr_method, tr_mv = _trace(op, int(num_probes), trace_method, seeds["trace"])
        nm["trace"] = tr_mv
        wall["trace"] = time.perf_counter() - t0

        # ---- density
        t0 = time.perf_counter()
        steps = min(int(lanczos_steps), n)
        bar.stage("spectral density", int(slq_probes) * steps)
        before = op.num_matvecs
        dens = spectral_density(op, num_probes=int(slq_probes), num_steps=steps, seed=seeds["density"])
        nm["density"] = op.num_matvecs - before
        wall["density"] = time.perf_counter() - t0

        # ---- per layer
        layers = None
        if per_layer:
            t0 = time.perf_counter()
            blocks = build_operator(operator, model, loss_fn, data, names, seed=seed, per_layer=True,
                                    process_group=process_group)
            layers = []
            total = 0
            for name, blk in zip(blocks.names, blocks.blocks):
                bar.stage(f"layer {name}", None)
                wblk = bar.wrap(blk)
                e1 = _top_eig(wblk, 1, tol, seeds["eigen"])
                t, se, meth, mv = _trace(wblk, int(num_probes), trace_method, seeds["trace"])
                layers.append(LayerSummary(
                    name=name, num_params=blk.shape[0], top_eigenvalue=float(e1.eigenvalues[0]),
                    residual=float(e1.residuals[0]), trace=t, trace_std_error=se, trace_method=meth,
                    num_matvecs=e1.num_matvecs + mv))
                total += e1.num_matvecs + mv
            nm["per_layer"] = total
            wall["per_layer"] = time.perf_counter() - t0
    finally:
        bar.close()

    nm["total"] = sum(nm.values())
    n_examples = getattr(base, "num_data", None)  # counted by the operator's scan of the data
    n_batches = getattr(base, "num_batches", None)
    if n_examples is None or n_batches is None:
        n_examples, n_batches = _data_size(data)
    n_all = sum(p.numel() for p in model.parameters())
    desc = description or f"{type(model).__name__} with {n_all} parameters"
    model_info = {
        "description": desc,
        "class": type(model).__name__,
        "repr": repr(model),
        "num_params_total": int(n_all),
        "loss": type(loss_fn).__name__ if isinstance(loss_fn, nn.Module) else getattr(loss_fn, "__name__", repr(loss_fn)),
        "num_examples": n_examples,
        "num_batches": n_batches,
        "dtype": str(op.dtype).replace("torch.", ""),
        "device": str(device),
    }
    settings = {
        "operator": operator, "params": params if isinstance(params, (str, type(None))) else list(params),
        "top_k": int(top_k), "num_probes": int(num_probes), "trace_method": trace_method,
        "slq_probes": int(slq_probes), "lanczos_steps": int(lanczos_steps), "tol": None if tol is None else float(tol),
        "per_layer": bool(per_layer), "seed": seed,
    }
    report = SpectrumReport(
        operator=operator, num_params=n, param_names=names,
        eigenvalues=[float(v) for v in eig.eigenvalues], residuals=[float(r) for r in eig.residuals],
        error_bounds=[float(b) for b in eig.error_bounds], converged=[bool(c) for c in eig.converged],
        trace=tr, trace_std_error=tr_se, trace_method=tr_method,
        trace_num_probes=0 if tr_method == "exact" else int(num_probes),
        density=dens, layers=layers, num_matvecs=nm, seeds=seeds, wall_time_s=wall,
        model=model_info, settings=settings,
    )
    if process_group not in (None, "local") and not curvature.distributed.is_rank_zero(process_group):
        out_dir = None  # rank 0 writes the files
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        save_spectrum_plot(report, out / "spectrum.png")
        wall["plot"] = time.perf_counter() - t0
        report = dataclasses.replace(report, files={"png": str(out / "spectrum.png"), "json": str(out / "summary.json")})
    wall["total"] = time.perf_counter() - t_start
    if out_dir is not None:
        with open(out / "summary.json", "w") as fh:
            json.dump(_finite(report.to_dict()), fh, indent=1)
    return report


def _finite(obj):
    """Replace NaN/inf (not valid JSON) by ``None`` recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
