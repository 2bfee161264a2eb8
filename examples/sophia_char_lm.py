"""Sophia (GNB estimator) vs AdamW on a small character-level transformer language model.

The text is generated from a small probabilistic grammar (no downloads): sentences like
"the small cat sees a red bird near the old tree ." with agreement-free but strongly
structured word order, so a 2-layer transformer (d_model = 64) can learn it in a few
hundred steps on a CPU.

    python examples/sophia_char_lm.py --fast          # seconds: one lr each, 60 steps
    python examples/sophia_char_lm.py                 # lr grid {1e-3, 3e-3, 1e-2, 3e-2}, 600 steps, 2 seeds
    python examples/sophia_char_lm.py --hutchinson    # also Sophia-H

Writes ``<out>/sophia_char_lm.png`` (validation loss vs steps and vs wall time) and
prints a table (optimizer, chosen lr, final train/validation loss, seconds).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from solvers import GNBEstimator, HutchinsonEstimator, Sophia

# ----------------------------------------------------------------------------- data
_GRAMMAR = {
    "S": [["NP", "VP", "."], ["NP", "VP", "PP", "."], ["if", "NP", "VP", ",", "NP", "VP", "."]],
    "NP": [["DET", "N"], ["DET", "ADJ", "N"], ["DET", "ADJ", "ADJ", "N"]],
    "VP": [["V", "NP"], ["V"], ["ADV", "V", "NP"]],
    "PP": [["P", "NP"]],
    "DET": [["the"], ["a"], ["every"], ["no"]],
    "N": [["cat"], ["dog"], ["bird"], ["tree"], ["house"], ["river"], ["child"], ["teacher"]],
    "ADJ": [["small"], ["red"], ["old"], ["quiet"], ["green"], ["happy"]],
    "V": [["sees"], ["likes"], ["follows"], ["finds"], ["hears"], ["watches"]],
    "ADV": [["often"], ["never"], ["slowly"]],
    "P": [["near"], ["under"], ["behind"], ["with"]],
}


def generate_text(num_sentences: int, seed: int) -> str:
    """Sentences sampled from ``_GRAMMAR`` with a seeded numpy generator."""
    rng = np.random.default_rng(seed)

    def expand(sym):
        if sym not in _GRAMMAR:
            return [sym]
        rule = _GRAMMAR[sym][rng.integers(len(_GRAMMAR[sym]))]
        return [w for s in rule for w in expand(s)]

    return " ".join(" ".join(expand("S")) for _ in range(num_sentences))


def make_data(seed: int = 0, train_sentences: int = 6000, val_sentences: int = 400):
    train, val = generate_text(train_sentences, seed), generate_text(val_sentences, seed + 1000)
    chars = sorted(set(train) | set(val))
    stoi = {c: i for i, c in enumerate(chars)}
    enc = lambda s: torch.tensor([stoi[c] for c in s], dtype=torch.long)  # noqa: E731
    return enc(train), enc(val), len(chars)


def get_batch(data: torch.Tensor, batch: int, block: int, g: torch.Generator):
    ix = torch.randint(len(data) - block - 1, (batch,), generator=g)
    X = torch.stack([data[i:i + block] for i in ix])
    Y = torch.stack([data[i + 1:i + block + 1] for i in ix])
    return X, Y


# ---------------------------------------------------------------------------- model
class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.heads = heads

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=2)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(D // self.heads)  # explicit: twice differentiable
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """A GPT-style character model: embeddings, ``layers`` pre-LN blocks, a linear head."""

    def __init__(self, vocab: int, d: int = 64, layers: int = 2, heads: int = 4, block: int = 64) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        return self.head(self.ln(self.blocks(x)))


def lm_loss(model, X, Y):
    logits = model(X)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y.reshape(-1))


# ------------------------------------------------------------------------- training
def run_training(opt_name: str, lr: float, steps: int, seed: int = 0, fast: bool = False, batch: int | None = None,
                 block: int | None = None, rho: float = 0.05, k: int = 10, eval_every: int | None = None) -> dict:
    """Train one model; returns losses per step, cumulative step time and validation losses.

    Both optimizers get the same schedule (linear warmup over 5% of the steps, cosine
    decay to 10%), gradient clipping at 1.0, weight decay 0.1 and the same batches.
    """
    batch = batch or (16 if fast else 32)
    block = block or (32 if fast else 64)
    train, val, V = make_data(seed=0, train_sentences=1500 if fast else 6000)
    torch.manual_seed(seed)
    model = CharTransformer(V, block=block)
    if opt_name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
        refresh_input = None
    elif opt_name in ("sophia", "sophia-h"):
        if opt_name == "sophia":
            est = GNBEstimator(model, "ce", seed=seed)
        else:
            est = HutchinsonEstimator(model, lambda z, y: F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1)),
                                      seed=seed)
        opt = Sophia(model.parameters(), lr=lr, betas=(0.965, 0.99), rho=rho if opt_name == "sophia" else 0.01,
                     weight_decay=0.1, estimator=est, update_interval=k)
        refresh_input = True
    else:
        raise ValueError(f"unknown optimizer {opt_name!r}")
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: (t + 1) / warm if t < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - warm) / max(1, steps - warm))))
    g = torch.Generator().manual_seed(1000 + seed)
    gv = torch.Generator().manual_seed(7)
    val_batches = [get_batch(val, 32 if fast else 64, block, gv) for _ in range(2 if fast else 8)]
    eval_every = eval_every or max(1, steps // 20)
    out = {"loss": [], "time": [], "val_step": [], "val_loss": [], "val_time": [], "vocab_size": V}
    elapsed = 0.0
    for t in range(steps):
        X, Y = get_batch(train, batch, block, g)
        t0 = time.perf_counter()
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model, X, Y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if refresh_input:
            opt.step(curvature_input=(X, Y))
        else:
            opt.step()
        sched.step()
        elapsed += time.perf_counter() - t0
        out["loss"].append(loss.item())
        out["time"].append(elapsed)
        if (t + 1) % eval_every == 0 or t == steps - 1:
            model.eval()
            with torch.no_grad():
                vl = float(np.mean([float(lm_loss(model, Xv, Yv)) for Xv, Yv in val_batches]))
            out["val_step"].append(t + 1)
            out["val_loss"].append(vl)
            out["val_time"].append(elapsed)
    if isinstance(opt, Sophia):
        out["win_rate"] = opt.last_win_rate
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fast", action="store_true", help="seconds: 60 steps, no grid, one seed")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 2; 1 with --fast)")
    ap.add_argument("--hutchinson", action="store_true", help="also run Sophia-H")
    ap.add_argument("--rho", type=float, default=0.05, help="Sophia-G clipping scale gamma (default 0.05)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (1: small model, no oversubscription)")
    ap.add_argument("--out", default="out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.steps or (60 if args.fast else 600)
    seeds = list(range(args.seeds or (1 if args.fast else 2)))
    full_grid = [1e-3, 3e-3, 1e-2, 3e-2]
    grids = {"adamw": [3e-3] if args.fast else full_grid,
             "sophia": [3e-3] if args.fast else full_grid}
    if args.hutchinson:
        grids["sophia-h"] = [3e-3] if args.fast else [1e-3, 3e-3]
    results, table = {}, []
    for name, grid in grids.items():
        best = None
        for lr in grid:
            runs = [run_training(name, lr, steps, seed=s, fast=args.fast, rho=args.rho) for s in seeds]
            final = float(np.mean([r["val_loss"][-1] for r in runs]))
            print(f"  {name:9s} lr={lr:.0e}: final val loss {final:.4f} (mean over {len(seeds)} seeds)", flush=True)
            if best is None or final < best[0]:
                best = (final, lr, runs)
        results[name] = best
        runs = best[2]
        table.append((name, best[1], float(np.mean([np.mean(r["loss"][-10:]) for r in runs])), best[0],
                      float(np.mean([r["time"][-1] for r in runs]))))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, (final, lr, runs) in results.items():
        vs = np.mean([r["val_loss"] for r in runs], axis=0)
        axes[0].plot(runs[0]["val_step"], vs, marker="o", ms=3, label=f"{name} (lr={lr:.0e})")
        axes[1].plot(np.mean([r["val_time"] for r in runs], axis=0), vs, marker="o", ms=3, label=name)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("wall time of training steps [s]")
    for ax in axes:
        ax.set_ylabel("validation loss (nats/char)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"char-level transformer (2 layers, d=64), {steps} steps, {len(seeds)} seed(s), best lr per optimizer")
    fig.tight_layout()
    fig.savefig(out / "sophia_char_lm.png", dpi=120)
    print(f"{'optimizer':10s} {'lr':>7s} {'train loss':>11s} {'val loss':>9s} {'seconds':>8s}")
    for name, lr, tr, vl, sec in table:
        print(f"{name:10s} {lr:7.0e} {tr:11.4f} {vl:9.4f} {sec:8.2f}")
    print(f"wrote {out / 'sophia_char_lm.png'}")
    return {name: {"lr": lr, "train": tr, "val": vl, "seconds": sec} for name, lr, tr, vl, sec in table}


if __name__ == "__main__":
    main()
