"""Reader-input gradients (``cud.circuits.gradients``) and the patched runner against their
definitions, for every variant the adapters claim.

- The *shared* capture (all heads of a layer read one normalised stream; each head's input
  gradient derived from its q/k/v gradients and the norm's Jacobian, summed over steps) gives
  the gradients of the *copies* capture (each head's input its own tensor, autograd throughout).
- A patched run (circuits of any density, different per sample) gives the logits of a direct
  implementation of METHOD §1: every reader's input is sum_u keep z_u + (1 - keep) z'_u.
"""

from __future__ import annotations

import pytest
import torch

from cud.circuits.attribution import AttributionSettings, attribute
from cud.circuits.ablation import make_ablation
from cud.circuits.faithfulness import faithfulness
from cud.circuits.gradients import ReaderGradients
from cud.circuits.metrics import AnswerTargets, metric_value
from cud.circuits.runner import EdgePatch, Interpolation, ResidualRunner

pytestmark = pytest.mark.usefixtures("single_thread")


def reader_gradients(runner, batch, baseline, metric="logprob", alphas=(0.5, 1.0)):
    """The summed reader gradients of a few interpolated passes (EAP-IG over activations)."""
    targets = AnswerTargets.from_batch(batch.input_ids, batch.answer_mask)
    with torch.no_grad():
        clean = runner.run(batch.input_ids, batch.attention_mask, logit_mask=targets.positions,
                           record=True)
        clean_logprob = targets.mean_logprob(clean.logits)
        z_base = baseline.for_batch(runner, batch)
    gradients = ReaderGradients(runner)
    path = Interpolation(clean.outputs, z_base, 1.0)
    for alpha in alphas:
        run = runner.run(batch.input_ids, batch.attention_mask, logit_mask=targets.positions,
                         capture=True, interpolation=path.at(alpha))
        values = metric_value(metric, targets.mean_logprob(run.logits), clean_logprob)
        gradients.add(run.capture, values)
    assert gradients.n_passes == len(alphas)
    return list(gradients.groups())


@pytest.mark.parametrize("baseline, n_passes", [("zero", 2), ("corrupt", 2), ("corrupt", 30)])
def test_shared_capture_gives_the_gradients_of_copies(variant_lm, padded_batch, baseline,
                                                      n_passes):
    """30 passes: more than 3H, so the kept per-pass terms are folded into one sum."""
    lm, batch = variant_lm, padded_batch
    base = make_ablation(baseline, tokenizer=lm.tokenizer)
    shared, copies = ResidualRunner(lm.adapter), ResidualRunner(lm.adapter, copies=True)
    assert not shared.copies and copies.copies
    assert n_passes == 2 or n_passes > 3 * lm.adapter.n_heads
    alphas = [k / n_passes for k in range(1, n_passes + 1)]
    got = reader_gradients(shared, batch, base, alphas=alphas)
    want = reader_gradients(copies, batch, base, alphas=alphas)
    g = shared.graph
    assert len(got) == len(want) == 2 * g.n_layers + 1
    b, t = batch.input_ids.shape
    for k, (x, y) in enumerate(zip(got, want)):
        v = 3 * g.n_heads if k % 2 == 0 and k < 2 * g.n_layers else 1
        assert x.shape == y.shape == (b, v, t, g.d_model)
        scale = y.abs().max().item()
        assert scale > 0
        assert (x - y).abs().max().item() <= 1e-5 * scale, f"group {k}"


@pytest.mark.parametrize("method", ["eap-ig-activations", "eap-ig-activations-by-layer",
                                    "eap-ig-inputs", "eap"])
def test_shared_capture_gives_the_scores_of_copies(variant_lm, padded_batch, method):
    lm, batch = variant_lm, padded_batch
    base = make_ablation("corrupt", tokenizer=lm.tokenizer)
    settings = AttributionSettings(method, 3, "logprob")
    got = attribute(ResidualRunner(lm.adapter), batch, base, settings)
    want = attribute(ResidualRunner(lm.adapter, copies=True), batch, base, settings)
    scale = want.edge_scores.abs().max().item()
    assert scale > 0
    assert (got.edge_scores - want.edge_scores).abs().max().item() <= 1e-5 * scale
    torch.testing.assert_close(got.clean_logprob, want.clean_logprob, rtol=0, atol=1e-5)


def test_shared_capture_gives_the_kl_scores_of_copies(family, make_lm, qa_samples):
    """The kl metric is second order in small changes, so its scores on tiny random models are
    below float32 resolution: compared in float64."""
    from cud.data import collate, encode_samples
    lm = make_lm(family, dtype=torch.float64)
    batch = collate(encode_samples(lm.tokenizer, qa_samples[:4]), lm.pad_token_id)
    settings = AttributionSettings("eap-ig-activations", 3, "kl")
    base = make_ablation("corrupt", tokenizer=lm.tokenizer)
    got = attribute(ResidualRunner(lm.adapter), batch, base, settings)
    want = attribute(ResidualRunner(lm.adapter, copies=True), batch, base, settings)
    scale = want.edge_scores.abs().max().item()
    assert scale > 0
    # LlamaRMSNorm computes in float32 even in a float64 model
    tol = (1e-5 if family == "llama" else 1e-6) * scale
    assert (got.edge_scores - want.edge_scores).abs().max().item() <= tol


# Patching against its definition ----------------------------------------------------------
def reference_patched_logits(lm, batch, keep, z_base):
    """METHOD §1 written out: reader v reads sum over its upstream nodes u of keep[u, v] z_u +
    (1 - keep[u, v]) z'_u (z_u on padding), plus the attention output biases upstream of it."""
    a = lm.adapter
    g = ResidualRunner(a).graph
    b, t = batch.input_ids.shape
    ctx = a.context(batch.attention_mask)
    valid = batch.attention_mask[:, :, None, None]
    z = torch.zeros(b, t, g.n_forward, g.d_model)

    def reader_input(n_up, v):
        k = keep[:, :n_up, v][:, None, :, None]
        patched = torch.where(valid, z_base[:, :, :n_up].expand(b, t, -1, -1), z[:, :, :n_up])
        x = (k * z[:, :, :n_up] + (1 - k) * patched).sum(2)
        for layer in range(a.n_layers):
            if a.attention_bias(layer) is not None and n_up >= g.mlp_forward(layer):
                x = x + a.attention_bias(layer)
        return x

    with torch.no_grad():
        z[:, :, 0] = a.embed(batch.input_ids)
        for layer in range(a.n_layers):
            n_att = g.attention_readers_upstream(layer)
            x_att = torch.stack([torch.stack([reader_input(n_att, g.qkv_backward(layer, i, h))
                                              for h in range(a.n_heads)], 2)
                                 for i in range(3)], 2)
            f0 = g.head_forward(layer, 0)
            z[:, :, f0:f0 + a.n_heads] = a.attention_heads(layer, x_att, ctx)
            x_mlp = reader_input(g.mlp_readers_upstream(layer), g.mlp_backward(layer))
            z[:, :, g.mlp_forward(layer)] = a.mlp(layer, x_mlp)
        return a.unembed(reader_input(g.n_forward, g.logits_backward))


def test_patched_runs_follow_the_definition(variant_lm, padded_batch, randomise):
    """One batch, four kinds of circuit: sparse (a runner sums over its few kept edges),
    dense (over its few patched ones), empty, and fractional keep values everywhere."""
    lm, batch = variant_lm, padded_batch
    runner = ResidualRunner(lm.adapter)
    g = runner.graph
    gen = torch.Generator().manual_seed(0)
    n = g.n_edges
    edges = torch.zeros(4, n)
    edges[0, torch.randperm(n, generator=gen)[:max(3, n // 20)]] = 1      # sparse circuit
    edges[1] = 1
    edges[1, torch.randperm(n, generator=gen)[:max(3, n // 20)]] = 0      # nearly everything
    edges[3] = torch.rand(n, generator=gen)                               # fractional
    keep = g.to_matrix(edges)
    z_base = torch.randn(1, 1, g.n_forward, g.d_model, generator=gen) * 0.5
    expected = reference_patched_logits(lm, batch, keep, z_base)
    with torch.no_grad():
        got = runner.run(batch.input_ids, batch.attention_mask,
                         patch=EdgePatch(keep=keep, baseline=z_base)).logits
    mask = batch.attention_mask
    clean = runner.run(batch.input_ids, mask).logits.detach()
    for i in range(4):
        assert (expected[i][mask[i]] - clean[i][mask[i]]).abs().max() > 1e-2  # not vacuous
        diff = (got[i][mask[i]] - expected[i][mask[i]]).abs().max().item()
        assert diff <= 1e-4, f"circuit {i}: patched run differs from the definition by {diff:.2e}"


def test_faithfulness_reuses_the_attributions_clean_logprob(make_lm, qa_samples):
    from cud.data import collate, encode_samples
    lm = make_lm("llama")
    runner = ResidualRunner(lm.adapter)
    batch = collate(encode_samples(lm.tokenizer, qa_samples[:3]), lm.pad_token_id)
    base = make_ablation("zero")
    att = attribute(runner, batch, base, AttributionSettings("eap-ig-activations-by-layer", 2))
    circuits = torch.zeros(3, runner.graph.n_edges, dtype=torch.bool)
    circuits[:, att.edge_scores.abs().argsort(1, descending=True)[0, :40]] = True
    given = faithfulness(runner, batch, circuits, base, "kl", clean_logprob=att.clean_logprob)
    computed = faithfulness(runner, batch, circuits, base, "kl")
    torch.testing.assert_close(given.faithfulness, computed.faithfulness, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(given.metric_baseline, computed.metric_baseline, rtol=1e-4,
                               atol=1e-7)
