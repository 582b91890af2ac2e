"""Edge attribution (METHOD §2).

- EAP is the exact first-order effect of patching one edge, checked against a finite difference
  of the patched metric in a continuous ``keep`` value of that edge, for every edge and sample;
- EAP-IG ranks edges like brute-force patching of every single edge does;
- a batch gives each sample exactly the scores it gets alone, for every method and baseline.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr

from cud.circuits.attribution import AttributionSettings, attribute
from cud.circuits.ablation import (CorruptAblation, MeanAblation, ZeroAblation,
                                               corrupt_input_ids, make_ablation)
from cud.circuits.faithfulness import patched_metric
from cud.circuits.metrics import AnswerTargets, metric_value
from cud.circuits.runner import EdgePatch, ResidualRunner
from cud.data import collate, encode_samples
from cud.data.encoding import Batch
from cud.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")

# Helpers ------------------------------------------------------------------------------------
def encode(lm, samples) -> Batch:
    return collate(encode_samples(lm.tokenizer, samples), lm.pad_token_id)


def repeat_batch(batch: Batch, k: int) -> Batch:
    """The batch stacked k times: row j * B + i is sample i."""
    return Batch(batch.ids * k, *(t.repeat(k, 1) for t in (
        batch.input_ids, batch.attention_mask, batch.answer_mask, batch.question_mask)))


def clean_mean_logprob(runner, batch, targets):
    with torch.no_grad():
        logits = runner.run(batch.input_ids, batch.attention_mask,
                            logit_mask=targets.positions).logits
    return targets.mean_logprob(logits)


def edge_kind(g, e: int) -> str:
    """'input->q', 'a->m', 'm->logits', ...: parent kind -> child kind."""
    parent, child = g.forward_names[g.edge_parent[e]], g.backward_names[g.edge_child[e]]
    parent = "input" if parent == "input" else parent[0]
    child = child[-2] if child.endswith(">") else ("logits" if child == "logits" else "m")
    return f"{parent}->{child}"


def patched_metric_per_edge(runner, batch, keep_value: float, metric: str, baseline=None,
                            chunk: int = 64) -> torch.Tensor:
    """(B, E): the metric of every sample with one edge at a time set to ``keep_value`` (every
    other edge kept), zero baseline unless given. Many edge variants of the batch go through
    one forward."""
    baseline = baseline or ZeroAblation()
    z_base = baseline.for_batch(runner, batch)  # (1 or B, ...): the batch's own baselines
    g = runner.graph
    b, e_total = len(batch), g.n_edges
    dtype = next(runner.adapter.model.parameters()).dtype
    out = torch.empty(b, e_total, dtype=torch.float64)
    base_targets = AnswerTargets.from_batch(batch.input_ids, batch.answer_mask)
    clean = clean_mean_logprob(runner, batch, base_targets)
    for start in range(0, e_total, chunk):
        edges = torch.arange(start, min(start + chunk, e_total))
        k = len(edges)
        big = repeat_batch(batch, k)
        targets = AnswerTargets.from_batch(big.input_ids, big.answer_mask)
        keep = torch.ones(k, e_total, dtype=dtype)
        keep[torch.arange(k), edges] = keep_value
        big_base = z_base if z_base.shape[0] == 1 else z_base.repeat(k, 1, 1, 1)
        values = patched_metric(runner, big, keep.repeat_interleave(b, 0), big_base, metric,
                                targets, clean.repeat(k))
        out[:, edges] = values.double().view(k, b).T
    return out


# EAP = first-order effect -------------------------------------------------------------------
def test_eap_score_is_the_derivative_of_the_patched_metric(family, make_lm, qa_samples):
    """score(u->v) = (z'_u - z_u) . dM/d(in_v) is -dM/d(keep_e) at keep = 1 (keep_e = 0 patches
    the edge), for every edge and every sample of a right-padded batch."""
    lm = make_lm(family, dtype=torch.float64)
    runner = ResidualRunner(lm.adapter)
    g = runner.graph
    batch = encode(lm, qa_samples[:3])
    scores = attribute(runner, batch, ZeroAblation(),
                       AttributionSettings("eap", 1, "logprob")).edge_scores.double()
    assert scores.shape == (3, g.n_edges) and scores.dtype == torch.float64

    # LlamaRMSNorm computes in float32 even in a float64 model: a wider step, looser tolerance
    eps = 1e-2 if family == "llama" else 1e-4
    derivative = (patched_metric_per_edge(runner, batch, 1 + eps, "logprob")
                  - patched_metric_per_edge(runner, batch, 1 - eps, "logprob")) / (2 * eps)
    expected = -derivative
    error = (scores - expected).abs()
    kinds: dict[str, list[int]] = {}
    for e in range(g.n_edges):
        kinds.setdefault(edge_kind(g, e), []).append(e)
    want = {f"{p}->{c}" for p in ("input", "a", "m") for c in ("q", "k", "v", "m", "logits")}
    assert set(kinds) == want
    for kind, edges in kinds.items():
        scale = expected[:, edges].abs().max().item()
        tol = 5e-4 * expected.abs().max().item() if family == "llama" else 1e-6 * scale
        assert scale > 2 * tol, f"{kind}: scores too small to compare ({scale:.1e})"
        worst = error[:, edges].max().item()
        assert worst <= tol, f"{kind} edges: EAP differs from the derivative by {worst:.2e} " \
                             f"(scale {scale:.2e}, tolerance {tol:.1e})"


@pytest.mark.parametrize("method", ["eap-ig-activations", "eap-ig-activations-by-layer",
                                    "eap-ig-inputs"])
def test_one_step_integrated_gradients_is_eap(method, family, make_lm, qa_samples):
    """With one step the only point of the path is the clean run (alpha = 1)."""
    lm = make_lm(family)
    runner = ResidualRunner(lm.adapter)
    batch = encode(lm, qa_samples[:3])
    base = CorruptAblation(lm.tokenizer)
    eap = attribute(runner, batch, base, AttributionSettings("eap", 1, "logprob"))
    ig = attribute(runner, batch, base, AttributionSettings(method, 1, "logprob"))
    scale = eap.edge_scores.abs().max()
    assert scale > 0
    assert (ig.edge_scores - eap.edge_scores).abs().max() <= 1e-6 * scale


def test_eap_ig_inputs_is_complete(family, make_lm, qa_samples):
    """Integrated gradients over the input embeddings: the input node's edge scores add up to
    the effect of patching the whole input node, M(input patched) - M(clean), up to the
    Riemann error of 50 steps (corrupt baseline: a smooth path)."""
    lm = make_lm(family, dtype=torch.float64, randomised=False)
    runner = ResidualRunner(lm.adapter)
    g = runner.graph
    batch = encode(lm, qa_samples[:3])
    baseline = CorruptAblation(lm.tokenizer)
    from_input = torch.as_tensor(g.edge_parent == 0)
    targets = AnswerTargets.from_batch(batch.input_ids, batch.answer_mask)
    clean = clean_mean_logprob(runner, batch, targets)
    keep = torch.ones(1, g.n_edges, dtype=torch.float64)
    keep[0, from_input] = 0
    for metric in ("logprob", "kl"):
        total = patched_metric(runner, batch, keep, baseline.for_batch(runner, batch), metric,
                               targets, clean) - metric_value(metric, clean, clean)
        scores = attribute(runner, batch, baseline,
                           AttributionSettings("eap-ig-inputs", 50, metric)).edge_scores
        summed = scores[:, from_input].double().sum(1)
        assert (summed - total).abs().max() <= 0.05 * total.abs().max(), (metric, summed, total)


def test_clean_logprob_is_hf_mean_answer_logprob(family, make_lm, qa_samples):
    lm = make_lm(family)
    batch = encode(lm, qa_samples[:4])
    att = attribute(ResidualRunner(lm.adapter), batch, ZeroAblation(),
                    AttributionSettings("eap", 1, "logprob"))
    assert att.ids == batch.ids
    with torch.no_grad():
        logits = lm.model(input_ids=batch.input_ids,
                          attention_mask=batch.attention_mask.long()).logits
    logp = torch.log_softmax(logits.double(), -1)
    for i in range(len(batch)):
        answer = batch.answer_mask[i].nonzero()[:, 0]
        expected = logp[i, answer - 1, batch.input_ids[i, answer]].mean()
        assert abs(att.clean_logprob[i].item() - expected.item()) <= 1e-5


# EAP-IG vs brute force ----------------------------------------------------------------------
@pytest.mark.parametrize("method, baseline", [("eap-ig-activations", "corrupt"),
                                              ("eap-ig-activations-by-layer", "zero"),
                                              ("eap-ig-inputs", "corrupt")])
@pytest.mark.parametrize("metric", ["kl", "logprob"])
def test_eap_ig_ranks_edges_like_brute_force_patching(metric, method, baseline, family, make_lm,
                                                      qa_samples, record_property):
    """Patch every single edge to the baseline and measure the change of the metric: its
    magnitude and the EAP-IG score's magnitude rank edges alike (Spearman).
    Float64 and the default small weights: single-edge effects are then near-linear and far
    above rounding (in float32 the smallest ones are, and rho drops to ~0.88-0.97)."""
    if family == "qwen3" and baseline == "zero":
        # measured 0.81/0.83 (kl and logprob, two samples): a head's normalised q and k are
        # scale-invariant along the path from 0, so the zero path's q/k edges get first-order
        # scores for effects that are second order; the corrupt path is fine (>= 0.94)
        pytest.skip("q/k norms: the zero path and brute force disagree on q/k edges (README)")
    if family == "gemma2" and baseline == "zero":
        # measured kl 0.796/0.813, logprob 0.870/0.849 (two samples): in the tiny default-init
        # model attention is nearly uniform, so single q/k-edge effects into layer 1 are second
        # order (~1e-13, v edges ~1e-8) while the zero path, moving a whole layer from 0,
        # scores them first order (~1e-11): the q/k edges rank at random (rho ~0); the corrupt
        # paths agree (>= 0.89)
        pytest.skip("post-norm: the zero path and brute force disagree on q/k edges (README)")
    if family == "gemma3_text" and baseline == "zero":
        # measured kl 0.732/0.764, logprob 0.785/0.824 (two samples): both causes above at once
        # (per-head q/k norms, post-norms; q/k edges rank at random, rho -0.2-0.4); the corrupt
        # paths agree (>= 0.89)
        pytest.skip("q/k norms and post-norm: the zero path and brute force disagree on q/k "
                    "edges (README)")
    lm = make_lm(family, dtype=torch.float64, randomised=False)
    runner = ResidualRunner(lm.adapter)
    batch = encode(lm, qa_samples[:2])
    base = make_ablation(baseline, tokenizer=lm.tokenizer)
    effect, scores = _brute_force_and_scores(runner, batch, base, method, metric)
    rhos = [spearmanr(effect[i].abs().numpy(), scores[i].abs().numpy()).statistic
            for i in range(len(batch))]
    record_property(f"spearman_{family}_{method}_{baseline}_{metric}",
                    [round(float(r), 3) for r in rhos])
    print(f"spearman {family} {method} {baseline} {metric}: "
          f"{[round(float(r), 3) for r in rhos]}")
    assert min(rhos) >= 0.85, f"Spearman(|brute force|, |EAP-IG|) = {rhos} for " \
                              f"{family}/{method}/{baseline}/{metric}"


def _brute_force_and_scores(runner, batch, base, method, metric):
    """(B, E) single-edge patching effects on the metric and (B, E) EAP-IG scores."""
    targets = AnswerTargets.from_batch(batch.input_ids, batch.answer_mask)
    clean = clean_mean_logprob(runner, batch, targets)
    effect = patched_metric_per_edge(runner, batch, 0.0, metric, base) \
        - metric_value(metric, clean, clean).double()[:, None]
    scores = attribute(runner, batch, base, AttributionSettings(method, 5, metric)).edge_scores
    return effect, scores


def test_joint_activations_and_the_zero_baseline_are_refused(make_lm, qa_samples):
    """Moving every node towards 0 at once only rescales the stream (normalised readers):
    refused, in the library and in the settings of a run."""
    from cud.circuits.pipeline import CircuitSettings
    lm = make_lm("llama")
    runner = ResidualRunner(lm.adapter)
    batch = encode(lm, qa_samples[:1])
    with pytest.raises(ConfigError, match="rescales the residual stream"):
        attribute(runner, batch, ZeroAblation(), AttributionSettings("eap-ig-activations", 2))
    with pytest.raises(ConfigError, match="eap-ig-activations-by-layer"):
        CircuitSettings(ablation="zero")
    assert CircuitSettings().ablation == "corrupt"
    CircuitSettings(method="eap-ig-activations-by-layer", ablation="zero")


def test_joint_activations_with_the_zero_baseline_would_explode(make_lm, qa_samples):
    """Why it is refused: on a pre-norm model (llama, no biases) every node moved to alpha z
    leaves every normalised reader input as it is, so the path's metric is flat while the
    straight-through gradients grow by about 1/alpha per layer crossed."""
    from cud.circuits.runner import Interpolation
    lm = make_lm("llama", num_hidden_layers=6)
    runner = ResidualRunner(lm.adapter)
    batch = encode(lm, qa_samples[:2])
    targets = AnswerTargets.from_batch(batch.input_ids, batch.answer_mask)
    with torch.no_grad():
        clean = runner.run(batch.input_ids, batch.attention_mask, logit_mask=targets.positions,
                           record=True)
        path = Interpolation(clean.outputs, ZeroAblation().for_batch(runner, batch), 1.0)
        moved = runner.run(batch.input_ids, batch.attention_mask, logit_mask=targets.positions,
                           interpolation=path.at(0.2))
    torch.testing.assert_close(targets.mean_logprob(moved.logits),
                               targets.mean_logprob(clean.logits), rtol=1e-3, atol=1e-3)


# Batched == one at a time -------------------------------------------------------------------
@pytest.fixture(scope="module")
def baselines_for(make_lm, qa_samples):
    """family -> {name: baseline}; the mean baseline is fitted on samples outside the batch."""
    cache = {}

    def get(family):
        if family not in cache:
            lm = make_lm(family)
            runner = ResidualRunner(lm.adapter)
            reference = [encode(lm, qa_samples[4:7]), encode(lm, qa_samples[7:])]
            cache[family] = {
                "zero": make_ablation("zero"),
                "mean": make_ablation("mean", runner=runner, reference=reference),
                "corrupt": make_ablation("corrupt", tokenizer=lm.tokenizer),
            }
        return cache[family]

    return get


@pytest.mark.parametrize("method, metric, baseline", [
    (method, metric, baseline)
    for method, metric in [("eap", "logprob"), ("eap-ig-activations", "kl"),
                           ("eap-ig-activations", "logprob"), ("eap-ig-activations-by-layer", "kl"),
                           ("eap-ig-inputs", "kl")]
    for baseline in ["zero", "mean", "corrupt"]
    if not (method == "eap-ig-activations" and baseline == "zero")])
def test_batched_scores_equal_one_sample_at_a_time(method, metric, baseline, family, make_lm,
                                                   qa_samples, baselines_for):
    lm = make_lm(family)
    runner = ResidualRunner(lm.adapter)
    base = baselines_for(family)[baseline]
    settings = AttributionSettings(method, 3, metric)
    samples = qa_samples[:4]
    batch = encode(lm, samples)
    assert len(set(batch.attention_mask.sum(1).tolist())) == 4  # four lengths: real padding
    together = attribute(runner, batch, base, settings)
    assert together.edge_scores.shape == (4, runner.graph.n_edges)
    assert together.edge_scores.dtype == torch.float32
    for i, sample in enumerate(samples):
        alone = attribute(runner, encode(lm, [sample]), base, settings).edge_scores[0]
        scale = alone.abs().max().item()
        assert scale > 0
        diff = (together.edge_scores[i] - alone).abs().max().item()
        assert diff <= 1e-5 * scale, \
            f"sample {i}: batched differs by {diff:.2e} (scale {scale:.2e})"


# Baselines ----------------------------------------------------------------------------------
def test_mean_baseline_is_the_mean_over_real_tokens(make_lm, qa_samples):
    lm = make_lm("llama")
    runner = ResidualRunner(lm.adapter)
    samples = qa_samples[:4]
    padded = MeanAblation.fit(runner, [encode(lm, samples)]).mean
    total, count = 0, 0
    for s in samples:
        b = encode(lm, [s])
        with torch.no_grad():
            out = runner.run(b.input_ids, b.attention_mask, record=True).outputs[0]
        total, count = total + out.double().sum(0), count + out.shape[0]
    assert padded.shape == (runner.graph.n_forward, runner.graph.d_model)
    torch.testing.assert_close(padded.double(), total / count, rtol=1e-5, atol=1e-6)


def test_corrupt_baseline_replaces_question_tokens_only_seeded_by_id(make_lm, qa_samples):
    lm = make_lm("gpt2")
    batch = encode(lm, qa_samples[:4])
    special = lm.tokenizer.all_special_ids
    vocab = len(lm.tokenizer)
    ids = corrupt_input_ids(batch, vocab, special)
    q = batch.question_mask
    assert q.any(1).all()
    assert torch.equal(ids[~q], batch.input_ids[~q])
    assert (ids[q] != batch.input_ids[q]).float().mean() > 0.9
    assert not torch.isin(ids[q], torch.tensor(special)).any()
    for i, s in enumerate(qa_samples[:4]):
        alone = corrupt_input_ids(encode(lm, [s]), vocab, special)[0]
        assert torch.equal(ids[i, :len(alone)], alone)
    assert not torch.equal(corrupt_input_ids(batch, vocab, special, seed=1), ids)


# Metrics and settings -----------------------------------------------------------------------
@pytest.mark.parametrize("delta", [1e-4, -1e-4, 1e-3, -3e-2])
def test_kl_metric_resolves_small_changes_in_float32(delta):
    """KL(p_clean || p) is second order in the change of log p; its terms cancel to first order,
    which float32 arithmetic cannot resolve (it returned noise for |delta| ~ 1e-4)."""
    clean = torch.tensor([-5.5, -0.7, -12.0], dtype=torch.float32)
    moved = clean + delta
    got = metric_value("kl", moved, clean)
    assert got.dtype == torch.float32
    lc, lp = clean.double(), moved.double()
    pc, p = lc.exp(), lp.exp()
    expected = pc * (lc - lp) + (1 - pc) * (torch.log1p(-pc) - torch.log1p(-p))
    assert (expected > 0).all()
    torch.testing.assert_close(got.double(), expected, rtol=1e-2, atol=0)
    assert (metric_value("kl", clean, clean) == 0).all()


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="zero gradient"):
        AttributionSettings("eap", 1, "kl")
    with pytest.raises(ConfigError, match="unknown attribution method"):
        AttributionSettings("eap-ig", 5, "kl")
    with pytest.raises(ConfigError, match="unknown metric"):
        AttributionSettings("eap-ig-activations", 5, "nll")
    with pytest.raises(ConfigError, match="steps"):
        AttributionSettings("eap-ig-activations", 0, "kl")
    assert AttributionSettings("eap-ig-activations", 4).alphas == [0.25, 0.5, 0.75, 1.0]
    assert AttributionSettings("eap", 7, "logprob").alphas == [1.0]


def test_patching_refuses_to_run_with_gradients(make_lm, qa_samples):
    lm = make_lm("gpt2")
    runner = ResidualRunner(lm.adapter)
    g = runner.graph
    batch = encode(lm, qa_samples[:1])
    patch = EdgePatch(keep=g.to_matrix(torch.ones(1, g.n_edges)),
                      baseline=torch.zeros(1, 1, g.n_forward, g.d_model))
    with pytest.raises(RuntimeError, match="no_grad"):
        runner.run(batch.input_ids, batch.attention_mask, patch=patch)
