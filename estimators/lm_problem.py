"""The built-in language-model problem: a tiny causal transformer on built-in synthetic text.

``python -m curvature spectrum --problem lm`` computes the blockwise Hessian spectra of
this model (Zhang et al. 2024).  Nothing is downloaded:

* **Text**: a seeded generator of sentences over a small vocabulary.  Words are spelled
  over a 12-letter alphabet and follow a sparse first-order Markov chain between
  words, separated by spaces, sentences end with ``.``.  A character-level model has to
  learn spelling (local structure) and which word follows which (attention back over the
  previous word), so the loss keeps falling for a few hundred steps.
* **Model** (:class:`TinyCausalLM`): token and position embeddings, ``num_layers``
  pre-norm transformer blocks (separate ``q``, ``k``, ``v`` and ``o`` projections so each
  is its own Hessian block, causal ``F.scaled_dot_product_attention``, a GELU MLP
  ``fc``/``proj``), a final LayerNorm and an output ``head``.  Logits ``[B, T, V]``.
* **Training**: AdamW on random windows for ``train_steps`` steps, fully determined by
  ``seed``; the curvature is then taken on a fixed evaluation set of windows (one batch).

The model calls ``F.scaled_dot_product_attention`` exactly as user code does; the
curvature operators select attention kernels that support second derivatives
themselves (``curvature.kernels``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TinyCausalLM", "synthetic_text", "LMProblem", "lm_problem", "CausalLMLoss"]

_ALPHABET = "abcdefghijkl"


def synthetic_text(num_chars: int = 60_000, *, num_words: int = 24, seed: int = 0) -> str:
    """A string of ``num_chars`` characters of seeded synthetic sentences (see the module doc)."""
    g = torch.Generator().manual_seed(seed)
    words = []
    while len(words) < num_words:
        length = int(torch.randint(2, 6, (1,), generator=g))
        w = "".join(_ALPHABET[int(i)] for i in torch.randint(0, len(_ALPHABET), (length,), generator=g))
        if w not in words:
            words.append(w)
    # sparse Markov chain between words: each word has 3 likely successors
    succ = torch.stack([torch.randperm(num_words, generator=g)[:3] for _ in range(num_words)])
    probs = torch.tensor([0.6, 0.3, 0.1])
    out, cur, sentence = [], int(torch.randint(0, num_words, (1,), generator=g)), 0
    total = 0
    while total < num_chars:
        token = words[cur]
        sentence += 1
        end = sentence >= 4 and float(torch.rand((), generator=g)) < 0.25
        piece = token + (". " if end else " ")
        out.append(piece)
        total += len(piece)
        if end:
            sentence = 0
        cur = int(succ[cur, int(torch.multinomial(probs, 1, generator=g))])
    return "".join(out)[:num_chars]


class _Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        h = self.ln1(x)

        def split(t: Tensor) -> Tensor:
            return t.view(B, T, self.heads, D // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, D))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class TinyCausalLM(nn.Module):
    """A GPT-style causal language model: ``[B, T]`` token ids -> ``[B, T, V]`` logits.

    Args:
        vocab_size: ``V``.
        context: maximum sequence length ``T``.
        d_model: width ``D`` (divisible by ``heads``).
        num_layers: transformer blocks.
        heads: attention heads.
    """

    def __init__(self, vocab_size: int, context: int = 32, d_model: int = 32, num_layers: int = 2,
                 heads: int = 2) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} must be divisible by heads={heads}.")
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, heads) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.shape[1]
        x = self.embed(idx) + self.pos(torch.arange(T, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


class CausalLMLoss(nn.Module):
    """Mean token cross-entropy of ``[B, T, V]`` logits against ``[B, T]`` next-token targets."""

    reduction = "mean"

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


@dataclass(frozen=True)
class LMProblem:
    """What :func:`lm_problem` returns.

    Attributes:
        model: the trained :class:`TinyCausalLM` (eval mode).
        loss_fn: the token-level cross-entropy (mean over tokens).
        data: one batch ``(inputs [N, T], targets [N, T])`` of evaluation windows.
        vocab: the characters, index = token id.
        description: one line for reports.
        train_loss, eval_loss: mean token cross-entropy (nats) after training.
    """

    model: nn.Module
    loss_fn: nn.Module
    data: tuple[Tensor, Tensor]
    vocab: str
    description: str
    train_loss: float
    eval_loss: float

    def __iter__(self):
        """Unpack as ``model, loss_fn, data``."""
        return iter((self.model, self.loss_fn, self.data))


def _windows(ids: Tensor, starts: Tensor, T: int) -> tuple[Tensor, Tensor]:
    offs = torch.arange(T + 1)
    w = ids[starts.unsqueeze(1) + offs]
    return w[:, :-1], w[:, 1:]


def lm_problem(
    *,
    context: int = 32,
    d_model: int = 32,
    num_layers: int = 2,
    heads: int = 2,
    train_steps: int = 300,
    batch_size: int = 32,
    lr: float = 3e-3,
    num_eval: int = 64,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> LMProblem:
    """Build, train and return the built-in LM problem (see the module docstring).

    Cost: ``train_steps`` AdamW steps on ``batch_size`` windows of ``context`` tokens
    (a few seconds on one CPU core with the defaults).  Deterministic given ``seed``
    (the global RNG is not used).
    """
    text = synthetic_text(seed=seed)
    vocab = "".join(sorted(set(text)))
    ids = torch.tensor([vocab.index(c) for c in text], dtype=torch.long)
    n_train = int(0.9 * len(ids))
    train_ids, eval_ids = ids[:n_train], ids[n_train:]
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyCausalLM(len(vocab), context, d_model, num_layers, heads)
    model = model.to(device=device, dtype=dtype)
    loss_fn = CausalLMLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(train_steps):
        starts = torch.randint(0, len(train_ids) - context - 1, (batch_size,), generator=g)
        X, Y = (t.to(device) for t in _windows(train_ids, starts, context))
        for group in opt.param_groups:  # cosine decay
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / train_steps))
        loss = loss_fn(model(X), Y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    starts = torch.linspace(0, len(eval_ids) - context - 2, num_eval).long()
    X, Y = (t.to(device) for t in _windows(eval_ids, starts, context))
    with torch.no_grad():
        eval_loss = float(loss_fn(model(X), Y))
    n = sum(p.numel() for p in model.parameters())
    desc = (f"tiny causal transformer ({num_layers} layers, d={d_model}, {heads} heads, context {context}, "
            f"vocab {len(vocab)}, {n:,} parameters) trained {train_steps} AdamW steps on synthetic text; "
            f"eval loss {eval_loss:.3f} nats/token on {num_eval} windows")
    return LMProblem(model=model, loss_fn=loss_fn, data=(X, Y), vocab=vocab, description=desc,
                     train_loss=float(loss.detach()), eval_loss=eval_loss)
