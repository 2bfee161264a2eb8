"""Sophia's training-step time against torch.optim.AdamW on the same model, in the same run.

Model: the GPT-2-style character model of examples/sophia_char_lm.py at 2 layers, d_model = 64
(batch 32 x 64 tokens).  One "step" = zero_grad + forward + backward + grad clipping + optimizer
step; for Sophia also the curvature refresh every k = 10 steps (GNB: one extra forward +
backward with sampled labels; Hutchinson: one gradient with graph + one HVP), so the
average over k consecutive steps is the honest per-step cost.  Blocks of 2k steps are
interleaved across optimizers, repeated, and the median block time is reported.

    python benchmarks/bench_sophia.py [--repeats 7] [--threads 1]

The official SophiaG code (Liuhong99/Sophia) is not installable from PyPI here: not run.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from solvers import GNBEstimator, HutchinsonEstimator, Sophia

ROOT = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("sophia_char_lm", ROOT / "examples" / "sophia_char_lm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make(name, ex, V, k):
    torch.manual_seed(0)
    model = ex.GPT(ex.GPTConfig(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_embd=64))
    if name == "adamw":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, foreach=True)
    if name == "adamw-single":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, foreach=False)
    if name == "sophia-g":
        est = GNBEstimator(model, "ce", seed=0)
        return model, Sophia(model.parameters(), lr=1e-3, rho=0.05, estimator=est, update_interval=k)
    if name == "sophia-g-single":
        est = GNBEstimator(model, "ce", seed=0)
        return model, Sophia(model.parameters(), lr=1e-3, rho=0.05, estimator=est, update_interval=k, foreach=False)
    if name == "sophia-h":
        est = HutchinsonEstimator(model, lambda z, y: F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1)), seed=0)
        return model, Sophia(model.parameters(), lr=1e-3, rho=0.01, estimator=est, update_interval=k)
    raise ValueError(name)


def block_time(model, opt, batches):
    t0 = time.perf_counter()
    for X, Y in batches:
        opt.zero_grad(set_to_none=True)
        ex_loss = F.cross_entropy(model(X).reshape(-1, model.lm_head.out_features), Y.reshape(-1))
        ex_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if isinstance(opt, Sophia):
            opt.step(curvature_input=(X, Y))
        else:
            opt.step()
    return (time.perf_counter() - t0) / len(batches)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ex = _example()
    train, _, V = ex.make_data(seed=0, train_sentences=2000)
    g = torch.Generator().manual_seed(0)
    batches = [ex.get_batch(train, 32, 64, g) for _ in range(2 * args.k)]
    names = ["adamw", "adamw-single", "sophia-g", "sophia-g-single", "sophia-h"]
    setups = {n: make(n, ex, V, args.k) for n in names}
    for n in names:  # warm-up (also fills optimizer state)
        block_time(*setups[n], batches)
    times = {n: [] for n in names}
    for _ in range(args.repeats):
        for n in names:
            times[n].append(block_time(*setups[n], batches))
    med = {n: statistics.median(v) for n, v in times.items()}
    base = med["adamw"]
    lines = [
        f"Model: char GPT (tied embeddings, no biases), 2 layers, d_model 64, {sum(p.numel() for p in setups['adamw'][0].parameters())} params, "
        f"batch 32 x 64 tokens, k = {args.k}; torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s); median over {args.repeats} interleaved blocks of {2 * args.k} steps.",
        "",
        "| optimizer | ms / step (incl. refresh) | ratio to AdamW (foreach) |",
        "| --- | --- | --- |",
    ]
    for n in names:
        lines.append(f"| {n} | {1e3 * med[n]:.2f} | {med[n] / base:.3f} |")
    lines.append("")
    lines.append("Official SophiaG (Liuhong99/Sophia): not installable from PyPI in this environment, not run.")
    print("\n".join(lines))
    return med


if __name__ == "__main__":
    main()
