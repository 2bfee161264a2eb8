"""Benchmark: Hessian / GGN products on transformers, in fused-kernel gradients, vs curvlinops 3.0.1.

Workloads (float32, one thread):

* ``gpt2``: a tiny Hugging Face GPT-2 built from a config (no download; default ``sdpa``
  attention): vocab 256, 2 layers, width 64, 4 heads, batch of 8 sequences of 32 tokens,
  next-token cross-entropy (``curvature.TokenCrossEntropyLoss(shift=True)``), one dict batch
  ``{"input_ids", "labels"}``;
* ``lm``: the built-in tiny causal LM, ``estimators.lm_problem.lm_problem()`` with its
  defaults (trained 300 AdamW steps, 64 evaluation windows of 32 tokens); trained once by
  the parent process and loaded by every case process.

Unit: one *fused-kernel gradient* (loss + backward with PyTorch's default kernels, i.e. what
the user trains with: flash SDPA on CPU), measured in the same process, interleaved with the
product.  Rows: this toolkit's Hessian and GGN product (one column), cached single-batch
graph and fresh (``cache=False``: every product rebuilds the graph, what a loader of many
batches costs per batch); curvlinops' ``HessianLinearOperator`` / ``GGNLinearOperator``
(no cache: fresh products) with the default kernels (recording the failure if its double
backward through fused attention fails) and under ``sdpa_kernel(SDPBackend.MATH)``, with the
relative difference to this toolkit's product; the float64 accuracy of both Hessian
products against central differences of the gradient; the wall time of the blockwise-spectra job
(``python -m curvature spectrum --problem lm --no-progress`` [``--fast``]).

Every case runs in its own subprocess (``--case``); the parent runs ``--repeats`` rounds over
all cases (interleaved), each case timing ``--inner`` interleaved pairs (unit, product) and
reporting the ratio of the medians; the table shows the median and min/max over rounds.

The job's CPU seconds (user + system of the child) are shown beside its wall time: on a
shared machine the wall time includes waiting for a core.

Run:  python benchmarks/bench_transformer.py --repeats 5 --out benchmarks/results_transformer.md
      python benchmarks/bench_transformer.py --quick        # 1 round, fewer inner pairs, --fast job only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # benchmark the checkout this script lives in
    sys.path.insert(0, REPO)

MODELS = ("gpt2", "lm")
PRODUCTS = ("toolkit Hessian, cached", "toolkit Hessian, fresh", "toolkit GGN, cached", "toolkit GGN, fresh",
            "curvlinops Hessian, default kernels", "curvlinops GGN, default kernels",
            "curvlinops Hessian, math kernel", "curvlinops GGN, math kernel")
JOBS = {"spectrum --problem lm": [], "spectrum --problem lm --fast": ["--fast"]}


def _hide_broken_torchvision() -> None:
    """Make an installed but unimportable torchvision look absent, so ``import transformers`` works.

    Same reason and mechanism as ``tests/conftest.py``: PyPI's CUDA torchvision wheel fails to
    import next to a CPU torch, and ``transformers`` imports it whenever it is installed.
    """
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None


def _scored_logits_module():
    from torch import nn

    class ScoredLogits(nn.Module):
        """The model with its output reshaped to ``[scored tokens, V]`` (curvlinops needs a Module)."""

        def __init__(self, model, reshape):
            super().__init__()
            self.model, self.reshape = model, reshape

        def forward(self, x):
            return self.reshape(self.model, x)

    return ScoredLogits


def _ScoredLogits(model, reshape):  # noqa: N802 - builds the nn.Module above lazily (torch imported late)
    return _scored_logits_module()(model, reshape)


def build(model_name: str):
    """``(model, loss_fn, toolkit_data, gradient_fn, curvlinops_args)`` for one workload.

    ``curvlinops_args = (model_func, loss_func, data, batch_size_fn)``: the same loss written for
    curvlinops (flattened ``[tokens, V]`` logits of the scored positions, ``nn.CrossEntropyLoss``).
    """
    import torch
    from torch import nn

    import curvature

    ce = nn.CrossEntropyLoss()
    if model_name == "gpt2":
        _hide_broken_torchvision()
        import transformers

        transformers.logging.set_verbosity_error()
        cfg = transformers.GPT2Config(vocab_size=256, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                      eos_token_id=0)
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(cfg).eval()
        ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
        loss_fn = curvature.TokenCrossEntropyLoss(shift=True)
        data = [{"input_ids": ids, "labels": ids}]
        params = list(model.parameters())

        def gradient():
            torch.autograd.grad(loss_fn(model(input_ids=ids).logits, ids), params)

        peer = (_ScoredLogits(model, lambda m, d: m(**d).logits[:, :-1].flatten(0, 1)), ce,
                [({"input_ids": ids}, ids[:, 1:].flatten())], lambda d: d["input_ids"].shape[0])
        return model, loss_fn, data, gradient, peer
    if model_name == "lm":
        model, loss_fn, (X, Y) = torch.load(_lm_cache_path(), weights_only=False)
        params = list(model.parameters())

        def gradient():
            torch.autograd.grad(loss_fn(model(X), Y), params)

        peer = (_ScoredLogits(model, lambda m, x: m(x).flatten(0, 1)), ce, [(X, Y.flatten())], None)
        return model, loss_fn, (X, Y), gradient, peer
    raise ValueError(f"unknown model {model_name!r}; choose from {MODELS}")


def _lm_cache_path() -> str:
    return os.environ["BENCH_TRANSFORMER_LM"]


def _train_lm_once(directory: str) -> str:
    """Train ``lm_problem()`` once and pickle ``(model, loss_fn, data)``: every case reuses the same weights."""
    import torch

    from estimators.lm_problem import lm_problem

    model, loss_fn, data = lm_problem()
    path = os.path.join(directory, "lm_problem.pt")
    torch.save((model, loss_fn, data), path)
    return path


def _interleaved(unit, product, inner: int) -> tuple[float, float]:
    """Median seconds of ``unit`` and ``product``, timed in ``inner`` interleaved pairs after a warm-up."""
    unit(), product()
    tu, tp = [], []
    for _ in range(inner):
        t0 = time.perf_counter()
        unit()
        tu.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        product()
        tp.append(time.perf_counter() - t0)
    return statistics.median(tu), statistics.median(tp)


def run_case(model_name: str, case: str, inner: int) -> dict:
    """Time one product case against the fused-kernel gradient (inside this process)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import curvature

    torch.set_num_threads(1)
    model, loss_fn, data, gradient, (model_func, loss_func, peer_data, batch_size_fn) = build(model_name)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    v = torch.randn(n, 1, generator=torch.Generator().manual_seed(2))
    out = {"parameters": n}
    kind = "Hessian" if "Hessian" in case else "GGN"
    toolkit_cls = curvature.HessianOperator if kind == "Hessian" else curvature.GGNOperator
    if case.startswith("toolkit"):
        op = toolkit_cls(model, loss_fn, data, cache=case.endswith("cached"))
        product = lambda: op @ v  # noqa: E731
    else:
        import curvlinops

        peer_cls = curvlinops.HessianLinearOperator if kind == "Hessian" else curvlinops.GGNLinearOperator
        kw = {"batch_size_fn": batch_size_fn} if batch_size_fn else {}
        try:
            cl = peer_cls(model_func, loss_func, params, peer_data, check_deterministic=False, **kw)
        except Exception as exc:  # noqa: BLE001 - recorded, not hidden
            return {**out, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        if case.endswith("math kernel"):
            def product():
                with sdpa_kernel(SDPBackend.MATH):
                    return cl @ v
        else:
            product = lambda: cl @ v  # noqa: E731
        try:
            got = product()
        except Exception as exc:  # noqa: BLE001 - the failure is the measurement
            return {**out, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        want = toolkit_cls(model, loss_fn, data) @ v
        out["rel_diff_to_toolkit"] = float((got - want).norm() / want.norm())
    tu, tp = _interleaved(gradient, product, inner)
    return {**out, "unit_ms": 1e3 * tu, "product_ms": 1e3 * tp, "ratio": tp / tu}


def run_accuracy(model_name: str) -> dict:
    """float64 relative errors of the Hessian products against central differences of the gradient.

    The difference quotient ``(g(theta + eps v) - g(theta - eps v)) / (2 eps)``, ``eps = 1e-5``,
    is computed under the math attention kernel (gradients only, no second derivative), so it is
    independent of either library's product.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import curvature
    import curvlinops

    torch.set_num_threads(1)
    model, loss_fn, data, _, (model_func, loss_func, peer_data, batch_size_fn) = build(model_name)
    model.double()
    params = list(model.parameters())
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(2))
    ours = curvature.HessianOperator(model, loss_fn, data) @ v
    kw = {"batch_size_fn": batch_size_fn} if batch_size_fn else {}
    cl = curvlinops.HessianLinearOperator(model_func, loss_func, params, peer_data, check_deterministic=False, **kw)
    with sdpa_kernel(SDPBackend.MATH):
        theirs = cl @ v
        flat0 = torch.nn.utils.parameters_to_vector(params).detach().clone()

        def grad_at(theta):
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(theta, params)
            loss = sum(loss_func(model_func(x), y) for x, y in peer_data)
            return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

        fd = (grad_at(flat0 + 1e-5 * v) - grad_at(flat0 - 1e-5 * v)) / 2e-5
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat0, params)
    err = lambda a: float((a - fd).norm() / fd.norm())  # noqa: E731
    return {"toolkit": err(ours), "curvlinops": err(theirs)}


def accuracy_section(results: dict) -> list[str]:
    lines = ["### Accuracy of the Hessian product (float64, against central differences of the gradient)", "",
             "| model | toolkit `HessianOperator` | curvlinops `HessianLinearOperator` (math kernel) |",
             "| --- | ---: | ---: |"]
    for model_name, r in results.items():
        if "error" in r:
            lines.append(f"| {model_name} | fails: `{r['error']}` | |")
        else:
            lines.append(f"| {model_name} | {r['toolkit']:.1e} | {r['curvlinops']:.1e} |")
    return lines + ["", "curvlinops 3.0.1 computes Hessian products forward-over-reverse; through LayerNorm that is "
                    "wrong in this torch (see the README's LayerNorm example), which is the 1e-3 \"rel. diff to "
                    "toolkit\" of its Hessian rows above. Its GGN agrees with ours to float32 rounding.", ""]


def run_job(flags: list[str]) -> dict:
    """Wall seconds of ``python -m curvature spectrum --problem lm --no-progress [flags]`` (own process)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "curvature", "spectrum", "--problem", "lm", "--no-progress",
               "--out", tmp, *flags]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=_child_env(), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1][:160]}"}
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu}


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _spawn_case(model_name: str, case: str, inner: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--case", f"{model_name}:{case}", "--inner", str(inner)]
    proc = subprocess.run(cmd, cwd=REPO, env=_child_env(), capture_output=True, text=True)
    if proc.returncode:
        return {"error": f"subprocess exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1][:160]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _span(values, fmt) -> str:
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}-{fmt(max(values))})"


def report(results: dict, args, versions: str) -> str:
    cmd = "python benchmarks/bench_transformer.py" + (" --quick" if args.quick else f" --repeats {args.repeats}"
                                                      f" --inner {args.inner} --jobs {args.jobs}")
    lines = ["## Transformers: Hessian / GGN products in fused-kernel gradients, vs curvlinops", "",
             f"Command: `{cmd}` ({versions}; one thread; each case in its own process, {args.repeats} interleaved "
             f"round(s) over all cases, each case the ratio of medians of {args.inner} interleaved (gradient, "
             "product) pairs; cells: median (min-max) over rounds).", "",
             "Unit: one fused-kernel gradient (loss + backward with the default kernels: fused SDPA).", ""]
    for model_name in MODELS:
        rows = results[model_name]
        first = next((r for rs in rows.values() for r in rs if "parameters" in r), {})
        title = {"gpt2": "Tiny Hugging Face GPT-2 (config-built, sdpa; 2 layers, d=64, 4 heads, vocab 256), "
                         "batch 8 x 32 tokens",
                 "lm": "Built-in tiny causal LM (`estimators.lm_problem.lm_problem()`), 64 windows x 32 tokens"}
        lines += [f"### {title[model_name]}: {first.get('parameters', 0):,} parameters, float32", "",
                  "| product (1 column) | per column / fused gradient | product ms | gradient ms | "
                  "rel. diff to toolkit |", "| --- | ---: | ---: | ---: | ---: |"]
        for case, rs in rows.items():
            errors = [r["error"] for r in rs if "error" in r]
            ok = [r for r in rs if "error" not in r]
            if errors and not ok:
                lines.append(f"| {case} | fails: `{errors[0]}` | | | |")
                continue
            diff = (f"{statistics.median(r['rel_diff_to_toolkit'] for r in ok):.1e}"
                    if "rel_diff_to_toolkit" in ok[0] else "")
            lines.append(f"| {case} | {_span([r['ratio'] for r in ok], lambda x: f'{x:.2f}x')} | "
                         f"{_span([r['product_ms'] for r in ok], lambda x: f'{x:.1f}')} | "
                         f"{statistics.median(r['unit_ms'] for r in ok):.1f} | {diff} |")
        lines.append("")
    if not results["jobs"]:
        return "\n".join(lines) + "\n"
    lines += [f"### Blockwise-spectra job (`python -m curvature ... --no-progress`), {args.job_repeats} run(s)", "",
              "| command | wall s | CPU s (user + sys) |", "| --- | ---: | ---: |"]
    for job, rs in results["jobs"].items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            lines.append(f"| `{job}` | fails: `{rs[0]['error']}` | |")
            continue
        lines.append(f"| `{job}` | {_span([r['wall_s'] for r in ok], lambda x: f'{x:.1f}')} | "
                     f"{_span([r['cpu_s'] for r in ok], lambda x: f'{x:.1f}')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="rounds over all cases (one subprocess per case each)")
    ap.add_argument("--inner", type=int, default=7, help="interleaved (gradient, product) pairs per subprocess")
    ap.add_argument("--quick", action="store_true", help="1 round, 3 inner pairs, only the --fast spectrum job")
    ap.add_argument("--job-repeats", type=int, default=1, help="runs of each spectrum job (in the first rounds)")
    ap.add_argument("--jobs", default="full,fast", help="spectrum jobs to time: full,fast (or none)")
    ap.add_argument("--out", default=None, help="write the markdown here")
    ap.add_argument("--accuracy-only", action="store_true", help="print only the float64 accuracy section")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # MODEL:CASE, run in a child process
    args = ap.parse_args(argv)
    if args.case:
        model_name, case = args.case.split(":", 1)
        run = run_accuracy(model_name) if case == "accuracy" else run_case(model_name, case, args.inner)
        print(json.dumps(run))
        return
    if args.accuracy_only:
        tmp = tempfile.TemporaryDirectory()
        os.environ["BENCH_TRANSFORMER_LM"] = _train_lm_once(tmp.name)
        print("\n".join(accuracy_section({m: _spawn_case(m, "accuracy", 0) for m in MODELS})))
        return
    if args.quick:
        args.repeats, args.inner, args.job_repeats = 1, 3, 1
    wanted = ["fast"] if args.quick else args.jobs.split(",")
    jobs = {k: v for k, v in JOBS.items() if ("fast" if "--fast" in v else "full") in wanted}
    results = {m: {c: [] for c in PRODUCTS} for m in MODELS}
    results["jobs"] = {k: [] for k in jobs}
    tmp = tempfile.TemporaryDirectory()
    os.environ["BENCH_TRANSFORMER_LM"] = _train_lm_once(tmp.name)  # inherited by the case processes
    for rnd in range(args.repeats):
        for model_name in MODELS:
            for case in PRODUCTS:
                r = _spawn_case(model_name, case, args.inner)
                results[model_name][case].append(r)
                print(f"round {rnd} {model_name:4s} {case:38s} {r}", file=sys.stderr, flush=True)
        for job, flags in (jobs.items() if rnd < args.job_repeats else ()):
            r = run_job(flags)
            results["jobs"][job].append(r)
            print(f"round {rnd} {job:38s} {r}", file=sys.stderr, flush=True)
    accuracy = {m: _spawn_case(m, "accuracy", 0) for m in MODELS}
    import torch
    from importlib.metadata import version

    versions = f"torch {torch.__version__}, transformers {version('transformers')}, " \
               f"curvlinops {version('curvlinops-for-pytorch')}"
    text = report(results, args, versions) + "\n" + "\n".join(accuracy_section(accuracy))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
