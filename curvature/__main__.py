"""Command line: ``python -m curvature <command>`` (also the console script ``curvature``).

Commands:

* ``spectrum``: the Hessian-spectrum report (top eigenvalues, trace with error bar,
  spectral density; a PNG plot and a JSON summary).  With no arguments it runs on a
  built-in, briefly trained small network; ``--model MODULE:FUNCTION`` runs it on
  yours.  See ``python -m curvature spectrum --help``.
* ``eos``: edge-of-stability / sharpness tracking (``curvature.cli_eos``).

This module is an application entry point, not part of the library: it may import
``estimators`` (the ``curvature`` package itself never does).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence

__all__ = ["main", "load_factory", "spectrum_main"]

_DTYPES = {"float32": "float32", "float64": "float64", "float16": "float16", "bfloat16": "bfloat16",
           "double": "float64", "float": "float32"}


# --------------------------------------------------------------------------- helpers
def load_factory(spec: str):
    """Import ``MODULE:FUNCTION`` (or ``path/to/file.py:FUNCTION``), call it, check the result.

    The current working directory is put on ``sys.path`` (as ``python -m`` does) so a
    module next to the user's shell is found from the console script too.

    Returns:
        ``(model, loss_fn, data)`` as the function returned them.

    Raises:
        ValueError: ``spec`` is not of the form ``MODULE:FUNCTION``; the function does
            not return a ``(model, loss_fn, data)`` triple with an ``nn.Module``, a
            callable and non-empty data.
        ImportError: the module cannot be imported.
        AttributeError: the module has no such function.
        TypeError: the attribute is not callable.
    """
    from torch import nn

    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(
            f"--model expects MODULE:FUNCTION (e.g. mypkg.mymod:make or ./my_model.py:make), got {spec!r}."
        )
    mod_name, fn_name = spec.split(":")
    if mod_name.endswith(".py"):
        path = os.path.abspath(mod_name)
        if not os.path.isfile(path):
            raise ImportError(f"--model {spec}: no such file {path!r}.")
        name = "_curvature_user_" + os.path.splitext(os.path.basename(path))[0]
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and mod_name.startswith(exc.name):
                raise ImportError(
                    f"--model {spec}: cannot import module {mod_name!r} (is it on the Python path? "
                    f"the current directory is {os.getcwd()!r})."
                ) from exc
            raise
    if not hasattr(module, fn_name):
        raise AttributeError(f"--model {spec}: module {mod_name!r} has no attribute {fn_name!r}.")
    fn = getattr(module, fn_name)
    if not callable(fn):
        raise TypeError(f"--model {spec}: {fn_name!r} is a {type(fn).__name__}, not a function.")
    result = fn()
    if isinstance(result, (tuple, list)) and len(result) == 3:
        model, loss_fn, data = result
    else:
        try:
            model, loss_fn, data = tuple(result)
        except (TypeError, ValueError):
            raise ValueError(
                f"--model {spec}: {fn_name}() must return (model, loss_fn, data), got "
                f"{type(result).__name__}{'' if not hasattr(result, '__len__') else ' of length %d' % len(result)}."
            ) from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec}: the first item returned must be a torch.nn.Module, got "
                         f"{type(model).__name__}.")
    if not callable(loss_fn):
        raise ValueError(f"--model {spec}: the second item returned must be a loss function "
                         f"loss_fn(output, target), got {type(loss_fn).__name__}.")
    if data is None:
        raise ValueError(f"--model {spec}: the third item returned (data) is None; return one batch "
                         "(X, y) or an iterable of batches.")
    return model, loss_fn, data


class _MovedData:
    """A re-iterable view of batches moved to a device / floating dtype."""

    def __init__(self, data, device, dtype) -> None:
        self.data, self.device, self.dtype = data, device, dtype

    def __iter__(self):
        for batch in self.data:
            yield _move_batch(batch, self.device, self.dtype)


def _move_batch(batch, device, dtype):
    import torch

    def move(t):
        if not isinstance(t, torch.Tensor):
            return t
        kw = {}
        if device is not None:
            kw["device"] = device
        if dtype is not None and t.is_floating_point():
            kw["dtype"] = dtype
        return t.to(**kw) if kw else t

    return tuple(move(t) for t in batch)


def _move_data(data, device, dtype):
    import torch

    if device is None and dtype is None:
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return _move_batch(data, device, dtype)
    return _MovedData(data, device, dtype)


# -------------------------------------------------------------------------- spectrum
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` only for options with a meaningful default."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


# default (full, --fast) sizes of the estimators
_SIZES = {"top_k": (10, 4), "probes": (64, 16), "slq_probes": (8, 4), "lanczos_steps": (80, 30)}


def _spectrum_parser(prog: str = "curvature spectrum") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Hessian-spectrum report: top eigenvalues (Lanczos), trace with its standard error "
            "(Hutch++), spectral density (stochastic Lanczos quadrature). Writes OUT/spectrum.png "
            "and OUT/summary.json and prints a table. Without --model it runs on a built-in small "
            "network briefly trained on a synthetic Gaussian-mixture classification task."
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--model", metavar="MODULE:FUNCTION", default=None,
                   help="a function returning (model, loss_fn, data); data is one batch (X, y) or an "
                        "iterable of batches (a DataLoader). Also accepts path/to/file.py:FUNCTION. "
                        "Default: the built-in problem.")
    p.add_argument("--operator", default="hessian",
                   choices=["hessian", "ggn", "fisher-mc", "fisher-empirical", "fisher-exact"],
                   help="curvature matrix")
    p.add_argument("--params", metavar="REGEX", default=None,
                   help="only parameters whose name matches this regular expression (re.search)")
    p.add_argument("--problem", default="mlp", choices=["mlp", "lm"],
                   help="built-in problem when --model is not given: mlp (a small classifier) or lm (a tiny "
                        "causal transformer on synthetic text; implies --blockwise)")
    p.add_argument("--blockwise", action="store_true",
                   help="per-layer spectral densities (one SLQ density per block, Zhang et al. 2024) "
                        "instead of the whole-matrix report; writes OUT/blocks.png and OUT/blocks.json")
    p.add_argument("--per-layer", action="store_true",
                   help="also the top eigenvalue and trace of each layer's diagonal block")
    p.add_argument("--top-k", type=int, default=None, help="number of largest eigenvalues [10; --fast: 4]")
    p.add_argument("--probes", type=int, default=None,
                   help="trace probes (products); the trace is exact when n <= probes [64; --fast: 16]")
    p.add_argument("--trace-method", default="hutch++", choices=["hutch++", "hutchinson", "xtrace"],
                   help="trace estimator; its standard error is the error bar")
    p.add_argument("--slq-probes", type=int, default=None, help="probes of the spectral density [8; --fast: 4]")
    p.add_argument("--lanczos-steps", type=int, default=None,
                   help="Lanczos steps per density probe [80; --fast: 30]")
    p.add_argument("--tol", type=float, default=None,
                   help="relative residual tolerance of the eigenpairs (default by dtype: 1e-6 float64, "
                        "1e-5 float32, 3e-2 bfloat16/float16)")
    p.add_argument("--seed", type=int, default=0, help="base seed of the estimators")
    p.add_argument("--out", default="spectrum_report", help="output directory")
    p.add_argument("--device", default=None,
                   help="move model and data here (e.g. cuda, cuda:1, cpu); default: leave them where "
                        "they are (built-in problem: cpu)")
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES),
                   help="convert model and floating data to this dtype (default: leave as is); float16 / bfloat16 products are accurate to about 1e-3 / 1e-2 relative, so pass a --tol above that (a tighter one reports converged=false with a warning)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads on the CPU (default: 1, which measured fastest for small "
                        "and medium models and on shared machines; raise it for large models on an idle CPU)")
    p.add_argument("--fast", action="store_true",
                   help="small settings for a smoke test (seconds): top-k 4, 16 trace probes, "
                        "4 x 30 density steps, shorter training of the built-in problem")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def spectrum_main(argv: Sequence[str] | None = None) -> int:
    """Run ``curvature spectrum`` with ``argv``; returns the exit code (0 on success)."""
    parser = _spectrum_parser()
    args = parser.parse_args(argv)
    import torch

    from estimators.default_problem import default_problem
    from estimators.report import spectrum_report

    args.slq_probes_given = args.slq_probes is not None
    args.lanczos_steps_given = args.lanczos_steps is not None
    for name, (full, fast) in _SIZES.items():  # explicit values win over --fast
        if getattr(args, name) is None:
            setattr(args, name, fast if args.fast else full)
    dtype = None if args.dtype is None else getattr(torch, _DTYPES[args.dtype])
    device = None
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError as exc:
            parser.error(f"--device {args.device!r}: {exc}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    elif device is None or device.type == "cpu":
        # Measured: the curvature products of small and medium models gain little from
        # intra-op threads, and torch's default thread count stalls badly on a shared CPU
        # (a user model's --per-layer report: 20-138 s with the default vs 5 s with one
        # thread on a busy 2-core machine).  --threads N raises it (large models, idle CPUs).
        torch.set_num_threads(1)

    if args.model is None and args.problem == "lm":
        from estimators.lm_problem import lm_problem

        prob = lm_problem(train_steps=100 if args.fast else 300, dtype=dtype or torch.float32,
                          device=device or "cpu")
        model, loss_fn, data, description = prob.model, prob.loss_fn, prob.data, prob.description
        args.blockwise = True
    elif args.model is None:
        prob = default_problem(steps=100 if args.fast else 200, dtype=dtype or torch.float32,
                               device=device or "cpu")
        model, loss_fn, data, description = prob.model, prob.loss_fn, prob.data, prob.description
    else:
        try:
            model, loss_fn, data = load_factory(args.model)
        except (ImportError, AttributeError, TypeError, ValueError) as exc:
            parser.error(str(exc))
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
            data = _move_data(data, device, dtype)
        description = f"{args.model} -> {type(model).__name__}"
    if args.blockwise:
        from estimators.block_report import blockwise_spectrum_report

        try:
            report = blockwise_spectrum_report(
                model, loss_fn, data, operator=args.operator, params=args.params,
                num_probes=args.slq_probes if args.slq_probes_given else (2 if args.fast else 4),
                num_steps=args.lanczos_steps if args.lanczos_steps_given else (15 if args.fast else 40),
                seed=args.seed, out_dir=args.out, description=description,
                progress=False if args.no_progress else None,
            )
        except (ValueError, TypeError, NotImplementedError) as exc:
            parser.error(str(exc))
        print(report.summary())
        return 0
    try:
        report = spectrum_report(
            model, loss_fn, data, operator=args.operator, params=args.params, top_k=args.top_k,
            num_probes=args.probes, trace_method=args.trace_method, slq_probes=args.slq_probes,
            lanczos_steps=args.lanczos_steps, tol=args.tol, per_layer=args.per_layer, seed=args.seed,
            out_dir=args.out, description=description, progress=False if args.no_progress else None,
        )
    except (ValueError, TypeError, NotImplementedError) as exc:
        parser.error(str(exc))
    print(report.summary())
    return 0


# ------------------------------------------------------------------------------ eos
def eos_main(argv: Sequence[str] | None = None) -> int:
    """Run ``curvature eos`` (implemented in ``curvature.cli_eos``, imported lazily)."""
    try:
        cli_eos = importlib.import_module("curvature.cli_eos")
    except ModuleNotFoundError as exc:
        if exc.name == "curvature.cli_eos":
            print("curvature eos: this installation has no edge-of-stability command "
                  "(module curvature.cli_eos is missing).", file=sys.stderr)
            return 2
        raise
    rc = cli_eos.main(list(argv) if argv is not None else [])
    return 0 if rc is None else int(rc)


_COMMANDS = {
    "spectrum": (spectrum_main, "Hessian-spectrum report: top eigenvalues, trace, density, PNG + JSON"),
    "eos": (eos_main, "edge-of-stability tracking: sharpness during training vs 2/lr"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``curvature <command> [options]``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: curvature {" + ",".join(_COMMANDS) + "} [options]   (curvature COMMAND --help)"
    if not argv or argv[0] in ("-h", "--help"):
        lines = [usage, "", "commands:"] + [f"  {name:<10} {helptext}" for name, (_, helptext) in _COMMANDS.items()]
        print("\n".join(lines), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        import curvature

        print(f"curvature-toolkit {curvature.__version__}")
        return 0
    command = argv[0]
    if command not in _COMMANDS:
        print(f"{usage}\ncurvature: error: unknown command {command!r}; choose one of "
              f"{', '.join(_COMMANDS)}.", file=sys.stderr)
        return 2
    return _COMMANDS[command][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
