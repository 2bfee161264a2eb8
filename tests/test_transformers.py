"""Hugging Face ``transformers`` models as they come: tiny GPT-2 and BERT built from configs.

No download: the models are built locally from configs with their default attention
implementation (``sdpa``, whose fused CPU kernel has no double backward).  The truth is
computed independently of this package's batch adapter, loss table and weighting: the
model called as ``model(**batch)``, the shifted next-token cross-entropy written out with
``F.cross_entropy`` (Hugging Face's own loss upcasts logits to float32, which would cap a
float64 check at 1e-8), combined over batches by token counts, differentiated twice by
plain autograd under the math attention kernel.
"""

import pytest
import torch
import transformers  # in the test extra (tests/conftest.py hides a broken torchvision first)
from torch.nn.attention import SDPBackend, sdpa_kernel

import curvature
import estimators
from tests.dense_truth import rel_err

V, T = 16, 8


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=8, n_layer=1, n_head=2, n_inner=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                  eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def _bert():
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=T, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=3, pad_token_id=0)
    torch.manual_seed(1)
    return transformers.BertForSequenceClassification(cfg).double().eval()


def _lm_batches():
    """Two dict batches of unequal size with right padding: unequal counts of counted tokens."""
    g = torch.Generator().manual_seed(0)
    out = []
    for B, lengths in ((3, [8, 5, 3]), (2, [6, 8])):
        ids = torch.randint(1, V, (B, T), generator=g)
        mask = torch.zeros(B, T, dtype=torch.long)
        for i, L in enumerate(lengths):
            mask[i, :L] = 1
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _counted(batch):
    return int((batch["labels"][:, 1:] != -100).sum())  # the shifted targets Hugging Face counts


def _shifted_ce_sum(logits, labels):
    """Sum over counted tokens of the next-token cross-entropy (position t predicts t + 1)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")


def _truth_loss(model, batches):
    """theta -> full-data mean token loss through the model's own loss (math attention kernel)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    total = sum(_counted(b) for b in batches)

    def loss_of(flat):
        pieces, i = {}, 0
        for n, s in zip(names, shapes):
            pieces[n] = flat[i:i + s.numel()].reshape(s)
            i += s.numel()
        out = 0.0
        for b in batches:
            inputs = {k: t for k, t in b.items() if k != "labels"}
            logits = torch.func.functional_call(model, pieces, (), inputs).logits
            out = out + _shifted_ce_sum(logits, b["labels"]) / total
        return out

    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return loss_of, flat0


def _truth_hvp(loss_of, flat0, v):
    with sdpa_kernel(SDPBackend.MATH):
        x = flat0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_of(x), x, create_graph=True)
        (hv,) = torch.autograd.grad(g, x, grad_outputs=v)
    return hv


def _truth_ggn_vp(model, batches, v):
    """J^T H_z J v with H_z the Hessian of the model's own loss w.r.t. the logits (autograd)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    total = sum(_counted(b) for b in batches)
    out = torch.zeros_like(flat0)
    with sdpa_kernel(SDPBackend.MATH):
        for b in batches:
            inputs = {k: t for k, t in b.items() if k != "labels"}

            def logits_of(flat):
                pieces, i = {}, 0
                for n, s in zip(names, shapes):
                    pieces[n] = flat[i:i + s.numel()].reshape(s)
                    i += s.numel()
                return torch.func.functional_call(model, pieces, (), inputs).logits

            z, jv = torch.func.jvp(logits_of, (flat0,), (v,))
            zl = z.detach().requires_grad_(True)
            loss = _shifted_ce_sum(zl, b["labels"]) / total
            (gz,) = torch.autograd.grad(loss, zl, create_graph=True)
            (hz,) = torch.autograd.grad(gz, zl, grad_outputs=jv)
            _, vjp = torch.func.vjp(logits_of, flat0)
            out += vjp(hz)[0]
    return out


@pytest.fixture(scope="module")
def gpt2_case():
    model = _gpt2()
    batches = _lm_batches()
    return model, batches


def _settings():
    return (torch.backends.mha.get_fastpath_enabled(), torch.backends.cuda.flash_sdp_enabled(),
            torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())


def test_gpt2_default_attention_is_fused(gpt2_case):
    """Precondition of the tests below: the model uses sdpa, which cannot be differentiated twice."""
    model, batches = gpt2_case
    assert model.config._attn_implementation == "sdpa"
    loss_of, flat0 = _truth_loss(model, batches)
    x = flat0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_of(x), x, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(g, x, grad_outputs=torch.ones_like(g))


def test_gpt2_products_equal_the_models_own_loss_truth(gpt2_case):
    model, batches = gpt2_case
    loss_fn = curvature.TokenCrossEntropyLoss(shift=True)
    loss_of, flat0 = _truth_loss(model, batches)
    v = torch.randn(flat0.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    before = _settings()
    H = curvature.HessianOperator(model, loss_fn, batches)
    assert H.num_data == 5
    assert rel_err(H @ v, _truth_hvp(loss_of, flat0, v)) < 1e-10
    Gv_true = _truth_ggn_vp(model, batches, v)
    for jvp in ("auto", "reverse"):
        G = curvature.GGNOperator(model, loss_fn, batches, jvp=jvp)
        assert rel_err(G @ v, Gv_true) < 1e-10
    F = curvature.FisherOperator(model, loss_fn, batches, kind="exact")
    assert rel_err(F @ v, Gv_true) < 1e-10
    assert _settings() == before  # the user's attention settings are back


def test_gpt2_sum_reduction_is_token_count_times_mean(gpt2_case):
    model, batches = gpt2_case
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(6))
    mean = curvature.HessianOperator(model, curvature.TokenCrossEntropyLoss(shift=True), batches) @ v
    summed = curvature.HessianOperator(model, curvature.TokenCrossEntropyLoss(shift=True, reduction="sum"),
                                       batches) @ v
    assert rel_err(summed, sum(_counted(b) for b in batches) * mean) < 1e-10


def test_gpt2_labels_passed_to_the_model_change_nothing(gpt2_case):
    """``model(**batch)`` with the labels in the batch (Hugging Face computes its own loss, ignored)."""
    model, batches = gpt2_case
    loss_fn = curvature.TokenCrossEntropyLoss(shift=True)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(7))
    plain = curvature.HessianOperator(model, loss_fn, batches) @ v
    adapter = curvature.BatchAdapter(pass_labels=True)
    with_labels = curvature.HessianOperator(model, loss_fn, batches, adapter=adapter) @ v
    assert rel_err(with_labels, plain) < 1e-12


def test_gpt2_estimators_against_the_dense_truth(gpt2_case):
    model, batches = gpt2_case
    loss_fn = curvature.TokenCrossEntropyLoss(shift=True)
    loss_of, flat0 = _truth_loss(model, batches)
    n = flat0.numel()
    with sdpa_kernel(SDPBackend.MATH):
        x = flat0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_of(x), x, create_graph=True)
        rows = [torch.autograd.grad(g, x, grad_outputs=e, retain_graph=True)[0]
                for e in torch.eye(n, dtype=torch.float64)]
    H_true = torch.stack(rows)
    H_true = (H_true + H_true.T) / 2
    ev = torch.linalg.eigvalsh(H_true)
    H = curvature.HessianOperator(model, loss_fn, batches)
    top = estimators.top_eigenvalues(H, k=3, tol=1e-8, seed=0)
    assert torch.allclose(top.eigenvalues.sort().values, ev[-3:], rtol=1e-6, atol=1e-9)
    tr = estimators.hutchinson_trace(H, num_probes=200, seed=0)
    assert abs(float(tr.estimate) - float(ev.sum())) < 4 * float(tr.std_error) + 1e-9
    dens = estimators.spectral_density(H, num_probes=2, num_steps=20, seed=0)
    m1 = dens.moments(2)[0][1]  # tr(H)/n, exact per probe; unbiased over probes
    assert abs(float(m1) * n - float(ev.sum())) < 0.5 * float(ev.abs().sum())
    blocks = curvature.block_diagonal(curvature.HessianOperator, model, loss_fn, batches)
    spectra = estimators.block_spectra(blocks, num_probes=1, num_steps=400, seed=0)
    start = 0
    for size, d in zip(spectra.sizes, spectra.densities):  # full Krylov per block: exact block extremes
        blk = H_true[start:start + size, start:start + size]
        start += size
        top_b = float(torch.linalg.eigvalsh(blk)[-1])
        assert abs(float(d.nodes.max()) - top_b) <= 1e-7 * max(1.0, abs(top_b))


def test_bert_classifier_dict_batches_with_padding():
    model = _bert()
    g = torch.Generator().manual_seed(3)
    batches = []
    for B in (3, 2):
        ids = torch.randint(1, V, (B, T), generator=g)
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, 5:] = 0
        ids = ids.masked_fill(mask == 0, 0)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (B,), generator=g)})
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(flat):
        pieces, i = {}, 0
        for n_, s in zip(names, shapes):
            pieces[n_] = flat[i:i + s.numel()].reshape(s)
            i += s.numel()
        return sum(torch.nn.functional.cross_entropy(
            torch.func.functional_call(model, pieces, (), {k: t for k, t in b.items() if k != "labels"}).logits,
            b["labels"], reduction="sum") / 5 for b in batches)

    v = torch.randn(flat0.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    H = curvature.HessianOperator(model, torch.nn.CrossEntropyLoss(), batches)
    assert rel_err(H @ v, _truth_hvp(loss_of, flat0, v)) < 1e-10
    G = curvature.GGNOperator(model, torch.nn.CrossEntropyLoss(), batches)
    Gv = G @ v
    assert float(v @ Gv) >= -1e-12  # PSD for a convex loss
    F = curvature.FisherOperator(model, torch.nn.CrossEntropyLoss(), batches, kind="exact")
    assert rel_err(F @ v, Gv) < 1e-10


def _full_loss(model, batches):
    loss_of, flat0 = _truth_loss(model, batches)
    return float(loss_of(flat0))


def test_newton_cg_and_sophia_steps_on_gpt2_with_dict_batches():
    """Solvers take the dict batches as they come; a NewtonCG step is the damped GGN solve and descends."""
    import copy

    import solvers

    model = _gpt2()
    batch = _lm_batches()[0]
    loss_fn = curvature.TokenCrossEntropyLoss(shift=True)
    before = [p.detach().clone() for p in model.parameters()]
    f0 = _full_loss(model, [batch])
    lam = 3.0
    opt = solvers.NewtonCG(model.parameters(), model=model, loss_fn=loss_fn, curvature="ggn", damping=lam,
                           adapt_damping=False, reject_increase=False, cg_tol=1e-12, cg_maxiter=2000)
    # the expected step, from the GGN operator (itself checked against the model's own loss above)
    G = curvature.GGNOperator(model, loss_fn, batch)
    g = G.loss_and_gradient()[1]
    expected = -torch.linalg.solve(G.to_dense() + lam * torch.eye(G.shape[0], dtype=torch.float64), g)
    opt.step(batch=batch)
    assert opt.info["accepted"], opt.info
    step = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(model.parameters(), before)])
    assert rel_err(step, expected) < 1e-6
    assert _full_loss(model, [batch]) < f0
    model2 = _gpt2()
    est = solvers.HutchinsonEstimator(model2, loss_fn, seed=0)
    sophia = solvers.Sophia(model2.parameters(), lr=1e-2, estimator=est, update_interval=1)
    f1 = _full_loss(model2, [batch])
    for _ in range(3):
        sophia.zero_grad()
        loss_fn(model2(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"]).backward()
        sophia.step(curvature_input=batch)
    assert _full_loss(model2, [batch]) < f1
    assert all(torch.isfinite(p).all() for p in model2.parameters())
    copy.deepcopy(sophia)  # the optimizer survives a copy with its estimator
