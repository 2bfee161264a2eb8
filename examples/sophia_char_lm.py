"""SophiaG vs AdamW on a character-level GPT, both by the official training recipe.

Both optimizers run the loop of the official code (Liuhong99/Sophia, ``train_sophiag.py``
and ``train_adam.py``, nanoGPT-based): a GPT-2-style model (tied embeddings, no biases,
pre-LN blocks, GPT-2 init), the mean cross-entropy over all tokens, gradient clipping at
1.0, weight decay on Linear weights only, linear warmup from 0 over 2% of the steps and
cosine decay to ``min_lr``.  Sophia runs through :class:`solvers.SophiaGRecipe` (GNB
estimate every k = 10 steps on a fresh batch, sampled-label gradient clipped at 1.0,
batch-size scaling by the token count, no estimate before the first step); AdamW by the
same loop with its official betas (0.9, 0.95), weight decay 0.1 and ``min_lr = lr/20``
(Sophia: betas (0.965, 0.99), rho 0.05, weight decay 0.2, ``min_lr = lr/40``, the ratios
of the official GPT-2 small configs).

The text is generated from a small probabilistic grammar (no downloads, no licence):
sentences like "the small cat sees a red bird near the old tree ." with strongly
structured word order.

    python examples/sophia_char_lm.py --fast        # seconds: tiny model, one lr, one seed (the test)
    python examples/sophia_char_lm.py               # the CPU sweep: 4 lrs x 3 seeds per optimizer (~12 CPU-minutes)
    python examples/sophia_char_lm.py --gpu         # a GPU-sized run (6 layers, d 384, block 256, 5000 steps)
    python examples/sophia_char_lm.py --rho-study   # Sophia at rho 0.5 / 2 (3 lrs x 3 seeds), into sophia.json

The sweep writes ``<out>/sophia.png`` (validation loss curves at each optimizer's best
lr, and final loss against lr) and ``<out>/sophia.json`` (every run's curve, the best lr,
steps to the target loss) and prints the table.  Default ``--out docs/reproductions``.
"""


import argparse
import functools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from solvers import SophiaGRecipe, official_lr, official_param_groups

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


@functools.lru_cache(maxsize=4)
def make_data(seed: int = 0, train_sentences: int = 6000, val_sentences: int = 400):
    """``(train, val, vocab_size)``: the encoded character streams (int64 tensors; cached, do not modify)."""
    train, val = generate_text(train_sentences, seed), generate_text(val_sentences, seed + 1000)
    chars = sorted(set(train) | set(val))
    stoi = {c: i for i, c in enumerate(chars)}
    enc = lambda s: torch.tensor([stoi[c] for c in s], dtype=torch.long)  # noqa: E731
    return enc(train), enc(val), len(chars)


def get_batch(data: torch.Tensor, batch: int, block: int, g: torch.Generator, device="cpu"):
    """A random batch ``(X, Y)`` of ``batch`` windows of ``block`` characters; ``Y`` = next characters."""
    ix = torch.randint(len(data) - block - 1, (batch,), generator=g)
    X = torch.stack([data[i:i + block] for i in ix])
    Y = torch.stack([data[i + 1:i + block + 1] for i in ix])
    return X.to(device), Y.to(device)


# ---------------------------------------------------------------------------- model
@dataclass(frozen=True)
class GPTConfig:
    """The official model's shape (nanoGPT ``GPTConfig``), ``bias=False`` as in the Sophia configs."""

    vocab_size: int
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    scale_attn_by_inverse_layer_idx: bool = True  # train_sophiag.py's default


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.n_head = cfg.n_head
        self.scale = 1.0 / (float(layer + 1) if cfg.scale_attn_by_inverse_layer_idx else 1.0)
        self.register_buffer("mask", torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool).tril())

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # explicit softmax attention (as the official model): twice differentiable for Sophia-H
        att = (q @ k.transpose(-2, -1)) * (self.scale / math.sqrt(k.shape[-1]))
        att = att.masked_fill(~self.mask[:T, :T], float("-inf")).softmax(-1)
        return self.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=False)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=False)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 as in the official ``model.py``: tied token embedding / head, GPT-2 init."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=False)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def forward(self, idx):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def lm_loss(model, X, Y):
    logits = model(X)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y.reshape(-1))


# ------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Setting:
    """One size of the experiment (model, batch, steps, grids)."""

    name: str
    n_layer: int
    n_head: int
    n_embd: int
    block: int
    batch: int
    steps: int
    eval_every: int
    val_batches: int
    train_sentences: int
    adamw_lrs: tuple[float, ...]
    sophia_lrs: tuple[float, ...]
    seeds: int
    device: str = "cpu"


SETTINGS = {
    # seconds; the test
    "fast": Setting("fast", 2, 2, 32, 32, 8, 60, 20, 2, 1500, (3e-3,), (3e-3,), 1),
    # the CPU sweep (2 shared cores): 3 layers, d 96 (0.34M parameters), 16 x 48 tokens per step
    "cpu": Setting("cpu", 3, 4, 96, 48, 16, 300, 25, 4, 6000, (1.5e-3, 3e-3, 6e-3, 1.2e-2),
                   (7.5e-4, 1.5e-3, 3e-3, 6e-3), 3),
    # one GPU: nanoGPT's shakespeare-char size (6 layers, d 384, 10.7M parameters), 64 x 256 tokens
    "gpu": Setting("gpu", 6, 6, 384, 256, 64, 5000, 250, 20, 60000, (3e-4, 6e-4, 1e-3, 2e-3),
                   (3e-4, 6e-4, 1e-3, 2e-3), 3, "cuda"),
}


# ------------------------------------------------------------------------- training
def run_training(opt_name: str, lr: float, setting: Setting | str = "cpu", seed: int = 0,
                 steps: int | None = None, rho: float = 0.05) -> dict:
    """Train one model by the official recipe; returns its curves.

    Args:
        opt_name: ``"sophia"`` (SophiaG by :class:`solvers.SophiaGRecipe`) or ``"adamw"``.
        lr: the peak learning rate.
        setting: a :class:`Setting` or a key of :data:`SETTINGS`.
        seed: model initialisation, batch stream and GNB label sampling.
        steps: override the setting's number of steps.
        rho: Sophia's clipping scale (the official GPT-2 configs' 0.05 by default).

    Returns:
        ``loss`` (training loss per step), ``val_step``/``val_loss`` (validation loss,
        mean over fixed batches), ``seconds``, ``vocab_size``, ``num_params``, and for
        Sophia ``win_rate`` (per evaluation) and ``curvature_updates``.
    """
    s = SETTINGS[setting] if isinstance(setting, str) else setting
    steps = steps or s.steps
    device = s.device
    train, val, V = make_data(seed=0, train_sentences=s.train_sentences)
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=V, block_size=s.block, n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd)
    model = GPT(cfg).to(device)
    g = torch.Generator().manual_seed(1000 + seed)

    def next_batch():
        return get_batch(train, s.batch, s.block, g, device)

    warmup = max(1, round(0.02 * steps))  # the official 2000 of 100000 iterations
    if opt_name == "sophia":
        recipe = SophiaGRecipe(model, next_batch, lr=lr, rho=rho, weight_decay=0.2, betas=(0.965, 0.99),
                               update_interval=10, grad_clip=1.0, max_iters=steps, warmup_iters=warmup,
                               min_lr=lr / 40, seed=seed)
        opt = recipe.optimizer
        step_fn = recipe.step
    elif opt_name == "adamw":
        opt = torch.optim.AdamW(official_param_groups(model, 0.1), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
        it = [0]

        def step_fn():  # train_adam.py's loop
            for group in opt.param_groups:
                group["lr"] = official_lr(it[0], lr=lr, warmup_iters=warmup, lr_decay_iters=steps, min_lr=lr / 20)
            X, Y = next_batch()
            model.train()
            loss = lm_loss(model, X, Y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            it[0] += 1
            return loss.detach()
    else:
        raise ValueError(f"unknown optimizer {opt_name!r}; use 'sophia' or 'adamw'")
    gv = torch.Generator().manual_seed(7)
    val_batches = [get_batch(val, s.batch, s.block, gv, device) for _ in range(s.val_batches)]
    out = {"loss": [], "val_step": [], "val_loss": [], "win_rate": [], "vocab_size": V,
           "num_params": sum(p.numel() for p in model.parameters())}

    def evaluate(t):
        model.eval()
        with torch.no_grad():
            vl = float(np.mean([float(lm_loss(model, Xv, Yv)) for Xv, Yv in val_batches]))
        out["val_step"].append(t)
        out["val_loss"].append(vl)
        if opt_name == "sophia":
            out["win_rate"].append(opt.last_win_rate)

    t0 = time.perf_counter()
    losses = []
    evaluate(0)
    for t in range(1, steps + 1):
        losses.append(step_fn())
        if t % s.eval_every == 0 or t == steps:
            evaluate(t)
    out["loss"] = [float(v) for v in torch.stack(losses).cpu()]
    out["seconds"] = time.perf_counter() - t0
    if opt_name == "sophia":
        out["curvature_updates"] = opt.num_curvature_updates
    return out


def steps_to_target(val_step: list[int], val_loss: list[float], target: float) -> int | None:
    """The first evaluated step whose validation loss is ``<= target`` (``None``: never)."""
    for t, v in zip(val_step, val_loss):
        if v <= target:
            return int(t)
    return None


def sweep(setting: Setting, *, log=print) -> dict:
    """Every (optimizer, lr, seed) run of ``setting``; best lr = lowest mean final validation loss."""
    results: dict = {"setting": asdict(setting), "runs": {}, "best": {}}
    for name, grid in (("adamw", setting.adamw_lrs), ("sophia", setting.sophia_lrs)):
        results["runs"][name] = {}
        for lr in grid:
            runs = [run_training(name, lr, setting, seed=sd) for sd in range(setting.seeds)]
            finals = [r["val_loss"][-1] for r in runs]
            results["runs"][name][f"{lr:g}"] = runs
            log(f"  {name:6s} lr={lr:<7g} final val loss {np.mean(finals):.4f} +- {np.std(finals):.4f} "
                f"({setting.seeds} seeds, {np.mean([r['seconds'] for r in runs]):.0f} s/run)")
    return summarize(results)


#: the clipping-scale study: Sophia at larger rho (win rates nearer the official 0.1-0.5 guidance)
RHO_STUDY = {"rhos": (0.5, 2.0), "lrs": (1.5e-3, 3e-3, 6e-3)}


def rho_study(setting: Setting, target: float | None, *, log=print) -> dict:
    """Sophia over :data:`RHO_STUDY`'s rho x lr grid, ``setting.seeds`` seeds each; a summary per cell.

    Each cell: mean/std of the final validation loss, the mean final win rate, and the
    steps to ``target`` per seed (``None``: not reached).
    """
    cells = []
    for rho in RHO_STUDY["rhos"]:
        for lr in RHO_STUDY["lrs"]:
            runs = [run_training("sophia", lr, setting, seed=sd, rho=rho) for sd in range(setting.seeds)]
            finals = [r["val_loss"][-1] for r in runs]
            cells.append({"rho": rho, "lr": lr, "final_val_loss_mean": float(np.mean(finals)),
                          "final_val_loss_std": float(np.std(finals)),
                          "final_win_rate": float(np.mean([r["win_rate"][-1] for r in runs])),
                          "steps_to_target": [None if target is None else
                                              steps_to_target(r["val_step"], r["val_loss"], target) for r in runs]})
            log(f"  sophia rho={rho:<4g} lr={lr:<7g} final val loss {cells[-1]['final_val_loss_mean']:.4f} "
                f"+- {cells[-1]['final_val_loss_std']:.4f}, win rate {cells[-1]['final_win_rate']:.3f}")
    return {"cells": cells, "seeds": setting.seeds}


def summarize(results: dict) -> dict:
    """Best lr per optimizer (lowest mean final validation loss), the target and steps to it.

    The target is the validation loss that every AdamW seed reaches at AdamW's best lr
    by the end of the budget; ``steps_to_target`` lists, per seed at each optimizer's
    best lr, the first evaluated step at or below it (``None``: not within the budget).
    """
    for name, by_lr in results["runs"].items():
        results["best"][name] = min(by_lr, key=lambda lr: np.mean([r["val_loss"][-1] for r in by_lr[lr]]))
    best_adam = results["runs"]["adamw"][results["best"]["adamw"]]
    target = float(max(r["val_loss"][-1] for r in best_adam))
    results["target_val_loss"] = target
    summary = {}
    for name in ("adamw", "sophia"):
        runs = results["runs"][name][results["best"][name]]
        reach = [steps_to_target(r["val_step"], r["val_loss"], target) for r in runs]
        summary[name] = {
            "lr": float(results["best"][name]),
            "final_val_loss_mean": float(np.mean([r["val_loss"][-1] for r in runs])),
            "final_val_loss_std": float(np.std([r["val_loss"][-1] for r in runs])),
            "steps_to_target": reach,
            "seconds_per_run": float(np.mean([r["seconds"] for r in runs])),
        }
        if name == "sophia":
            summary[name]["final_win_rate"] = float(np.mean([r["win_rate"][-1] for r in runs]))
    results["summary"] = summary
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["setting"]
    colors = {"adamw": "tab:blue", "sophia": "tab:red"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for name in ("adamw", "sophia"):
        lr = results["best"][name]
        runs = results["runs"][name][lr]
        steps = runs[0]["val_step"]
        for r in runs:
            axes[0].plot(steps, r["val_loss"], color=colors[name], alpha=0.25, lw=1)
        axes[0].plot(steps, np.mean([r["val_loss"] for r in runs], axis=0), color=colors[name], lw=2,
                     label=f"{'SophiaG' if name == 'sophia' else 'AdamW'} lr={lr} (mean of {len(runs)} seeds)")
        lrs = sorted(results["runs"][name], key=float)
        finals = [[r["val_loss"][-1] for r in results["runs"][name][k]] for k in lrs]
        axes[1].errorbar([float(k) for k in lrs], [np.mean(f) for f in finals], yerr=[np.std(f) for f in finals],
                         color=colors[name], marker="o", capsize=3, label="SophiaG" if name == "sophia" else "AdamW")
    axes[0].axhline(results["target_val_loss"], color="k", ls=":", lw=1, label="target (worst AdamW seed at best lr, final)")
    lo = min(min(np.mean([r["val_loss"] for r in results["runs"][n][results["best"][n]]], axis=0))
             for n in ("adamw", "sophia"))
    axes[0].set_ylim(lo - 0.05, lo + 1.0)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("validation loss (nats/char)")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("peak learning rate")
    axes[1].set_ylabel(f"final validation loss after {s['steps']} steps")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"char-level GPT ({s['n_layer']} layers, d={s['n_embd']}, {s['batch']}x{s['block']} tokens/step), "
                 f"official recipes, same step budget", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--fast", action="store_true", help="seconds: tiny model, one lr, one seed")
    size.add_argument("--gpu", action="store_true", help="the GPU-sized setting (needs CUDA)")
    ap.add_argument("--steps", type=int, default=None, help="override the number of steps")
    ap.add_argument("--seeds", type=int, default=None, help="override the number of seeds")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (1: small model, shared CPU)")
    ap.add_argument("--out", default="docs/reproductions")
    ap.add_argument("--rho-study", action="store_true",
                    help="Sophia at rho 0.5 and 2 (lr 1.5e-3, 3e-3, 6e-3): adds 'rho_study' to <out>/sophia.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    setting = SETTINGS["fast" if args.fast else "gpu" if args.gpu else "cpu"]
    if setting.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device (torch.cuda.is_available() is False).")
    if args.steps or args.seeds:
        setting = Setting(**{**asdict(setting), "steps": args.steps or setting.steps,
                             "seeds": args.seeds or setting.seeds})
    print(f"setting {setting.name}: {setting.n_layer} layers, d={setting.n_embd}, {setting.batch}x{setting.block} "
          f"tokens/step, {setting.steps} steps, {setting.seeds} seed(s)", flush=True)
    if args.rho_study:
        path = Path(args.out) / "sophia.json"
        results = json.loads(path.read_text()) if path.exists() else {}
        results["rho_study"] = rho_study(setting, results.get("target_val_loss"), log=lambda m: print(m, flush=True))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
        print(f"wrote the rho study into {path}")
        return results
    cpu0, wall0 = time.process_time(), time.perf_counter()
    results = sweep(setting, log=lambda m: print(m, flush=True))
    results["cpu_seconds"], results["wall_seconds"] = time.process_time() - cpu0, time.perf_counter() - wall0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "sophia.png")
    with open(out / "sophia.json", "w") as f:
        json.dump(results, f, indent=1)
    print(f"target validation loss (reached by every AdamW seed at its best lr): {results['target_val_loss']:.4f}")
    print(f"{'optimizer':9s} {'lr':>7s} {'final val':>10s} {'steps to target (per seed)':>28s} {'s/run':>6s}")
    for name, row in results["summary"].items():
        print(f"{name:9s} {row['lr']:7g} {row['final_val_loss_mean']:10.4f} {str(row['steps_to_target']):>28s} "
              f"{row['seconds_per_run']:6.0f}")
    print(f"wrote {out / 'sophia.png'} and {out / 'sophia.json'} ({results['cpu_seconds'] / 60:.1f} CPU-minutes, "
          f"{results['wall_seconds'] / 60:.1f} minutes wall)")
    return results


if __name__ == "__main__":
    main()
