"""The blockwise-spectrum report: per-block Hessian densities of a model, as PNG + JSON + table.

``python -m curvature spectrum --problem lm`` runs it on the built-in tiny causal
transformer (:mod:`estimators.lm_problem`); ``--blockwise`` runs it on a user model.
Blocks are the model's layers (weight and bias of a module together, as
:func:`curvature.parameter_groups` with ``grouping="layer"`` groups them): for a
transformer that is the embedding, attention query / key / value / output, MLP input and
output projections, norms and the head of every layer, the blocks of Zhang et al. (2024).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch

import curvature

from .block_spectra import BlockSpectra, block_spectra

__all__ = ["BlockwiseReport", "blockwise_spectrum_report"]

_OPERATORS = {
    "hessian": (curvature.HessianOperator, {}),
    "ggn": (curvature.GGNOperator, {}),
    "fisher-mc": (curvature.FisherOperator, {"kind": "mc"}),
    "fisher-empirical": (curvature.FisherOperator, {"kind": "empirical"}),
    "fisher-exact": (curvature.FisherOperator, {"kind": "exact"}),
}


@dataclass(frozen=True)
class BlockwiseReport:
    """What :func:`blockwise_spectrum_report` returns (and writes).

    Attributes:
        description: what was analysed.
        operator: which curvature matrix.
        spectra: the :class:`~estimators.block_spectra.BlockSpectra`.
        js_mean: mean pairwise Jensen-Shannon distance between block densities (block
            heterogeneity; Zhang et al. 2024).
        wall_seconds: time of the spectra.
        paths: files written (``png``, ``json``), empty when ``out_dir`` is ``None``.
    """

    description: str
    operator: str
    spectra: BlockSpectra
    js_mean: float
    wall_seconds: float
    paths: dict

    def summary(self) -> str:
        """A printable table: block, parameters, top Ritz value, trace."""
        s = self.spectra
        lines = [f"Blockwise {self.operator} spectra of: {self.description}",
                 f"{len(s.names)} blocks, {sum(s.sizes):,} parameters, {s.num_matvecs} products, "
                 f"{self.wall_seconds:.1f} s",
                 "", f"{'block':<22}{'params':>9}{'top Ritz value':>16}{'trace (SLQ)':>14}"]
        for name, size, top, tr in zip(s.names, s.sizes, s.top_ritz_values(), s.traces()):
            lines.append(f"{name:<22}{size:>9,}{top:>16.4g}{tr:>14.4g}")
        lines.append("")
        lines.append(f"block heterogeneity: mean pairwise Jensen-Shannon distance {self.js_mean:.3f} "
                     f"(0 = identical spectra, max {0.8326:.3f})")
        for kind, path in self.paths.items():
            lines.append(f"wrote {path}")
        return "\n".join(lines)


def blockwise_spectrum_report(
    model: torch.nn.Module,
    loss_fn,
    data,
    *,
    operator: str = "hessian",
    params=None,
    num_probes: int = 4,
    num_steps: int = 40,
    seed: int = 0,
    out_dir: str | None = "spectrum_report",
    description: str = "",
    progress: bool | None = None,
) -> BlockwiseReport:
    """Per-layer spectral densities of a model's curvature; writes ``blocks.png`` and ``blocks.json``.

    Args:
        model, loss_fn, data, params: as for the curvature operators.
        operator: ``"hessian"`` (default), ``"ggn"``, ``"fisher-mc"``, ``"fisher-empirical"``,
            ``"fisher-exact"``.
        num_probes, num_steps: SLQ probes and Lanczos steps per block.
        seed: probe seed.
        out_dir: where to write (``None``: nothing written).
        description: a line for the report.
        progress: a tqdm bar over the Lanczos steps (default: when stderr is a terminal).

    Cost: ``num_steps`` passes over the data, each multiplying every block with
    ``num_probes`` columns.
    """
    if operator not in _OPERATORS:
        raise ValueError(f"operator must be one of {sorted(_OPERATORS)}, got {operator!r}.")
    cls, kwargs = _OPERATORS[operator]
    op = curvature.block_diagonal(cls, model, loss_fn, data, params=params, **kwargs)
    bar = None
    if progress is None:
        progress = os.isatty(2)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, desc="blockwise SLQ", unit="step")
    t0 = time.perf_counter()
    try:
        spectra = block_spectra(
            op, num_probes, num_steps, seed=seed,
            progress=None if bar is None else (lambda j, m: bar.update(1)),
        )
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - t0
    js = spectra.js_distances()
    B = js.shape[0]
    js_mean = float(js.sum() / (B * (B - 1))) if B > 1 else 0.0
    paths = {}
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        paths["png"] = os.path.join(out_dir, "blocks.png")
        spectra.save_plot(paths["png"], title=f"Blockwise {operator} spectra (SLQ, log density): "
                                              f"{description[:90]}")
        paths["json"] = os.path.join(out_dir, "blocks.json")
        with open(paths["json"], "w") as fh:
            json.dump({"description": description, "operator": operator, "num_probes": num_probes,
                       "num_steps": num_steps, "wall_seconds": wall, "js_mean": js_mean,
                       "js_distances": js.tolist(), **spectra.to_dict()}, fh, indent=1)
    return BlockwiseReport(description=description, operator=operator, spectra=spectra, js_mean=js_mean,
                           wall_seconds=wall, paths=paths)
