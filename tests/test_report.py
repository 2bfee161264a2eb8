"""The spectrum report (``python -m curvature spectrum`` / ``estimators.spectrum_report``).

Truth: dense float64 Hessians / GGNs by double backward (tests/dense_truth.py) and their
``torch.linalg.eigvalsh``.  Eigenvalue tolerances come from the reported residuals
(some eigenvalue lies within ``||A x - theta x||`` of ``theta``); trace tolerances from
the reported standard error (4 s.e.) or, for exact traces, rounding.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from curvature.__main__ import load_factory, main
from dense_truth import dense_ggn, dense_hessian
from estimators import SpectrumReport, spectrum_report

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def fixture_module(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    import report_fixture

    return report_fixture


def _png_size(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


def _check_eigs(eigs, residuals, dense: torch.Tensor) -> None:
    """Each reported eigenvalue is the k-th largest true one, within its residual bound."""
    truth = torch.linalg.eigvalsh(dense).flip(0)[: len(eigs)]
    scale = float(truth.abs().max())
    for k, (ev, r) in enumerate(zip(eigs, residuals)):
        assert abs(ev - float(truth[k])) <= r + 1e-10 * scale, (k, ev, float(truth[k]), r)


# ------------------------------------------------------------------------- CLI
def test_default_problem_fast_writes_png_and_json(tmp_path, capsys):
    out = tmp_path / "rep"
    rc = main(["spectrum", "--fast", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "top-4 eigenvalues" in printed and "trace =" in printed
    w, h = _png_size(out / "spectrum.png")
    assert w > 300 and h > 200
    summary = json.loads((out / "summary.json").read_text())
    eigs = summary["top_eigenvalues"]["eigenvalues"]
    assert len(eigs) == 4 and eigs == sorted(eigs, reverse=True)
    assert all(r >= 0 for r in summary["top_eigenvalues"]["residuals"])
    assert summary["trace"]["std_error"] > 0 and summary["trace"]["method"] == "hutch++"
    nm = summary["num_matvecs"]
    assert nm["total"] == nm["eigen"] + nm["trace"] + nm["density"]
    assert nm["density"] == 4 * 30 and nm["trace"] == 16
    assert summary["model"]["num_examples"] == 2000 and summary["num_params"] == 676
    assert summary["seeds"] == {"eigen": 0, "trace": 1, "density": 2}
    assert summary["wall_time_s"]["total"] > 0
    # the density's extreme Ritz value is a Rayleigh quotient: it cannot exceed the top eigenvalue
    assert summary["density"]["ritz_max"] <= eigs[0] * (1 + 1e-4)
    w = torch.tensor(summary["density"]["weights"])
    assert torch.allclose(w.sum(dim=1), torch.ones(4, dtype=w.dtype), atol=1e-6)


def test_user_model_top_eigenvalues_and_trace_match_dense(tmp_path, fixture_module):
    out = tmp_path / "user"
    rc = main(["spectrum", "--model", "report_fixture:make", "--top-k", "3", "--probes", "30",
               "--slq-probes", "3", "--lanczos-steps", "20", "--out", str(out), "--no-progress",
               "--tol", "1e-10"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    model, loss_fn, (X, y) = fixture_module.make()
    H = dense_hessian(model, loss_fn, X, y)
    assert summary["num_params"] == H.shape[0] == 43
    _check_eigs(summary["top_eigenvalues"]["eigenvalues"], summary["top_eigenvalues"]["residuals"], H)
    tr = summary["trace"]
    assert tr["method"] == "hutch++" and tr["std_error"] > 0  # 30 probes < n = 43: estimated
    assert abs(tr["estimate"] - float(torch.trace(H))) <= 4 * tr["std_error"]
    assert summary["model"]["dtype"] == "float64"
    _png_size(out / "spectrum.png")


@pytest.mark.parametrize("method", ["hutchinson", "xtrace"])
def test_other_trace_methods_within_four_standard_errors(fixture_module, method):
    model, loss_fn, (X, y) = fixture_module.make()
    rep = spectrum_report(model, loss_fn, (X, y), top_k=1, num_probes=30, trace_method=method,
                          slq_probes=1, lanczos_steps=5, out_dir=None, progress=False)
    exact = float(torch.trace(dense_hessian(model, loss_fn, X, y)))
    assert rep.trace_method == method and rep.trace_std_error > 0
    assert abs(rep.trace - exact) <= 4 * rep.trace_std_error


def test_exact_trace_when_probes_cover_n_and_ggn_operator(fixture_module):
    model, loss_fn, (X, y) = fixture_module.make()
    rep = spectrum_report(model, loss_fn, (X, y), operator="ggn", top_k=2, num_probes=43,
                          slq_probes=2, lanczos_steps=43, tol=1e-10, out_dir=None, progress=False)
    G = dense_ggn(model, loss_fn, X, y)
    assert rep.trace_method == "exact" and rep.trace_std_error == 0.0
    assert abs(rep.trace - float(torch.trace(G))) <= 1e-10 * float(torch.trace(G))
    _check_eigs(rep.eigenvalues, rep.residuals, G)
    # a full Lanczos run (43 steps = n) recovers the spectrum: nodes inside [lambda_min, lambda_max]
    ev = torch.linalg.eigvalsh(G)
    lo, hi = rep.spectrum_range
    assert float(ev[0]) - 1e-9 <= lo and hi <= float(ev[-1]) + 1e-9
    assert not rep.files


def test_per_layer_table_matches_dense_blocks(tmp_path, fixture_module, capsys):
    out = tmp_path / "layers"
    rc = main(["spectrum", "--model", "report_fixture:make", "--per-layer", "--top-k", "2",
               "--probes", "64", "--slq-probes", "2", "--lanczos-steps", "10", "--tol", "1e-10",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    assert "per layer" in capsys.readouterr().out
    rows = json.loads((out / "summary.json").read_text())["per_layer"]
    model, loss_fn, (X, y) = fixture_module.make()
    assert [r["name"] for r in rows] == ["0", "2"]
    for r in rows:
        layer = dict(model.named_children())[r["name"]]
        H = dense_hessian(model, loss_fn, X, y, params=list(layer.parameters()))
        assert r["num_params"] == H.shape[0]
        _check_eigs([r["top_eigenvalue"]], [r["residual"]], H)
        assert r["trace_method"] == "exact"  # blocks of 25 and 18 entries <= 64 probes
        assert abs(r["trace"] - float(torch.trace(H))) <= 1e-10 * float(H.abs().sum())


def test_params_regex_selects_sub_hessian(fixture_module):
    model, loss_fn, (X, y) = fixture_module.make()
    rep = spectrum_report(model, loss_fn, (X, y), params=r"^2\.", top_k=2, num_probes=100,
                          slq_probes=1, lanczos_steps=5, tol=1e-10, out_dir=None, progress=False)
    assert rep.param_names == ["2.weight", "2.bias"] and rep.num_params == 18
    H = dense_hessian(model, loss_fn, X, y, params=[model[2].weight, model[2].bias])
    _check_eigs(rep.eigenvalues, rep.residuals, H)
    assert abs(rep.trace - float(torch.trace(H))) <= 1e-10 * float(H.abs().sum())


def test_loader_equals_concatenated_batch_and_is_reproducible(fixture_module):
    model, loss_fn, batches = fixture_module.make_loader()
    _, _, (X, y) = fixture_module.make()
    kw = dict(top_k=2, num_probes=20, slq_probes=2, lanczos_steps=10, tol=1e-10, out_dir=None, progress=False)
    a = spectrum_report(model, loss_fn, batches, **kw)
    b = spectrum_report(model, loss_fn, batches, **kw)
    assert a.eigenvalues == b.eigenvalues and a.trace == b.trace  # same seed, same numbers
    assert torch.equal(a.density.nodes, b.density.nodes)
    assert a.model["num_batches"] == 2 and a.model["num_examples"] == 40
    _check_eigs(a.eigenvalues, a.residuals, dense_hessian(model, loss_fn, X, y))


def test_model_mode_and_grads_untouched(fixture_module):
    model, loss_fn, data = fixture_module.make()
    model.train()
    spectrum_report(model, loss_fn, data, top_k=1, num_probes=10, slq_probes=1, lanczos_steps=5,
                    out_dir=None, progress=False)
    assert model.training and all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------- bad input
def test_load_factory_errors(fixture_module):
    with pytest.raises(ValueError, match="MODULE:FUNCTION"):
        load_factory("report_fixture")
    with pytest.raises(ImportError, match="cannot import module 'no_such_module_xyz'"):
        load_factory("no_such_module_xyz:make")
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        load_factory("report_fixture:nope")
    with pytest.raises(TypeError, match="not a function"):
        load_factory("report_fixture:NOT_CALLABLE")
    with pytest.raises(ValueError, match=r"must return \(model, loss_fn, data\)"):
        load_factory("report_fixture:bad_return")
    with pytest.raises(ValueError, match="torch.nn.Module"):
        load_factory("report_fixture:bad_model")
    with pytest.raises(ValueError, match=r"\(data\) is None"):
        load_factory("report_fixture:no_data")
    with pytest.raises(ImportError, match="no such file"):
        load_factory("missing_dir/model.py:make")
    model, _, _ = load_factory(str(TESTS / "report_fixture.py") + ":make")  # a file path works too
    assert isinstance(model, nn.Module)


def test_cli_reports_bad_model_clearly(fixture_module, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["spectrum", "--model", "report_fixture:bad_return", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "must return (model, loss_fn, data)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["spectrum", "--model", "report_fixture:make", "--params", "nomatch", "--out", str(tmp_path)])
    assert "matches no trainable parameter" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["spectrum", "--model", "report_fixture:empty_loader", "--out", str(tmp_path)])
    assert "data is empty" in capsys.readouterr().err
    assert main(["nosuchcommand"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_spectrum_report_argument_errors(fixture_module):
    model, loss_fn, data = fixture_module.make()
    with pytest.raises(ValueError, match="data is None"):
        spectrum_report(model, loss_fn, None, out_dir=None)
    with pytest.raises(ValueError, match="Unknown operator"):
        spectrum_report(model, loss_fn, data, operator="laplacian", out_dir=None)
    with pytest.raises(ValueError, match="Unknown trace_method"):
        spectrum_report(model, loss_fn, data, trace_method="magic", out_dir=None)
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        spectrum_report(model, loss_fn, data, top_k=0, out_dir=None)
    with pytest.raises(ValueError, match="num_probes must be >= 4"):
        spectrum_report(model, loss_fn, data, num_probes=3, out_dir=None)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        spectrum_report(model, loss_fn, data, params="(", out_dir=None)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        spectrum_report(lambda x: x, loss_fn, data, out_dir=None)


def test_eos_subcommand_is_dispatched_lazily(monkeypatch, capsys):
    seen = {}
    fake = types.ModuleType("curvature.cli_eos")

    def fake_main(argv):
        seen["argv"] = argv
        return 0

    fake.main = fake_main
    monkeypatch.setitem(sys.modules, "curvature.cli_eos", fake)
    assert main(["eos", "--fast"]) == 0 and seen["argv"] == ["--fast"]
    monkeypatch.setitem(sys.modules, "curvature.cli_eos", None)  # as if the module were missing
    assert main(["eos"]) == 2
    assert "curvature.cli_eos is missing" in capsys.readouterr().err


def test_report_summary_text_lists_every_eigenvalue(fixture_module):
    model, loss_fn, data = fixture_module.make()
    rep = spectrum_report(model, loss_fn, data, top_k=3, num_probes=10, slq_probes=1,
                          lanczos_steps=5, out_dir=None, progress=False, description="tiny")
    text = rep.summary()
    assert isinstance(rep, SpectrumReport) and "tiny" in text
    for ev in rep.eigenvalues:
        assert f"{ev:13.6g}" in text
    assert math.isfinite(rep.to_dict()["density"]["sigma"])


@pytest.mark.slow
def test_default_problem_report_matches_dense_hessian_float64():
    """The built-in problem in float64: top-10 and trace against the dense 676 x 676 Hessian."""
    from estimators.default_problem import default_problem

    prob = default_problem(dtype=torch.float64)
    rep = spectrum_report(*prob, tol=1e-10, out_dir=None, progress=False)
    X, y = prob.data
    H = dense_hessian(prob.model, prob.loss_fn, X, y)
    _check_eigs(rep.eigenvalues, rep.residuals, H)
    assert abs(rep.trace - float(torch.trace(H))) <= 4 * rep.trace_std_error
    ev = torch.linalg.eigvalsh(H)
    # the picture the docs describe: a bulk near zero and a few outliers far above it
    assert float(ev.abs().median()) < 1e-2 * float(ev[-1])
    assert int((ev > 0.05 * ev[-1]).sum()) < 0.05 * ev.numel()
