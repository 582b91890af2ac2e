"""``convention="reference"``: cud's scores equal those of the reference EAP-IG code's algorithms
(hannamw/EAP-IG: EAP, EAP-IG-inputs, EAP-IG-activations by node group; patching, zero and mean
interventions), computed here by an independent implementation written from the reference's
description: a plain GPT-2 forward in the TransformerLens layout (every head reads its own q, k
and v copy of the stream; ``input`` is ``hook_embed``, the token embedding alone, and the
position embeddings are not a node), gradients by autograd at the reference's integration
points, scores summed over positions and the hidden dimension per sample.

What the reference does and cud's own convention does not (each is exercised below):
- EAP-IG-inputs integrates at alpha = k/m, k = 0..m-1;
- EAP-IG-activations moves one node group at a time (input, each layer's attention, each
  layer's MLP) and replaces its output by a constant, k = 1..m each, averaged over (2L+1) m;
- with the zero and mean interventions the activations' path starts at 0, while the score
  multiplies by (ablation - clean).
"""

from __future__ import annotations

import math

import pytest
import torch

from cud.circuits.ablation import CorruptAblation, MeanAblation, ZeroAblation
from cud.circuits.attribution import AttributionSettings, attribute
from cud.circuits.metrics import AnswerTargets
from cud.circuits.runner import ResidualRunner
from cud.data import collate, encode_samples
from cud.errors import ConfigError

STEPS = 3


@pytest.fixture(scope="module")
def gpt2(make_lm):
    return make_lm("gpt2", dtype=torch.float64)


@pytest.fixture(scope="module")
def batch(gpt2, qa_samples):
    return collate(encode_samples(gpt2.tokenizer, qa_samples[:3]), gpt2.pad_token_id)


# --- the independent forward (TransformerLens layout) --------------------------------------------

class Forward:
    """A GPT-2 forward written out: node outputs (input = token embedding, every head's result,
    every MLP) and reader inputs (every head's own q, k, v copy of the stream, every MLP input,
    the logits input). ``replace``: {group: tensor} puts a constant in place of a node group's
    output (the reference's output-interpolation hook); ``input_value``: the input node's value
    (a leaf of the graph, the reference's input interpolation)."""

    def __init__(self, lm):
        self.m = lm.model
        cfg = self.m.config
        self.L, self.H, self.d = cfg.n_layer, cfg.n_head, cfg.n_embd
        self.e = self.d // self.H

    def __call__(self, ids, mask, replace=None, input_value=None):
        replace = replace or {}
        tr = self.m.transformer
        b, t = ids.shape
        outputs, readers = {}, {}
        token = tr.wte(ids) if input_value is None else input_value
        token = replace.get("input", token)
        outputs["input"] = token
        resid = token + tr.wpe(torch.arange(t))[None]
        causal = torch.ones(t, t, dtype=torch.bool).tril()[None, None] & mask[:, None, None, :]
        for layer, block in enumerate(tr.h):
            copies = resid[:, :, None, None, :].expand(b, t, 3, self.H, self.d)
            readers[f"a{layer}"] = copies
            y = block.ln_1(copies)                                        # (B, T, 3, H, d)
            w = block.attn.c_attn.weight.view(self.d, 3, self.H, self.e)  # Conv1D: (in, out)
            bias = block.attn.c_attn.bias.view(3, self.H, self.e)
            qkv = torch.einsum("btkhd,dkhe->btkhe", y, w) + bias
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))   # (B, H, T, e)
            att = (q @ k.transpose(-1, -2)) / math.sqrt(self.e)
            att = att.masked_fill(~causal, torch.finfo(att.dtype).min).softmax(-1)
            o = att @ v                                                   # (B, H, T, e)
            w_o = block.attn.c_proj.weight.view(self.H, self.e, self.d)
            heads = torch.einsum("bhte,hed->bthd", o, w_o)                 # (B, T, H, d)
            heads = replace.get(f"a{layer}", heads)
            outputs[f"a{layer}"] = heads
            mid = resid + heads.sum(2) + block.attn.c_proj.bias
            x_mlp = mid.view_as(mid)
            readers[f"m{layer}"] = x_mlp
            mlp = block.mlp(block.ln_2(x_mlp))
            mlp = replace.get(f"m{layer}", mlp)
            outputs[f"m{layer}"] = mlp
            resid = mid + mlp
        x_log = resid.view_as(resid)
        readers["logits"] = x_log
        return self.m.lm_head(tr.ln_f(x_log)), outputs, readers

    def groups(self):
        return ["input"] + [g for layer in range(self.L) for g in (f"a{layer}", f"m{layer}")]


def answer_logprob(logits, batch):
    """(B,) mean answer log-probability (the ``logprob`` metric)."""
    targets = AnswerTargets.from_batch(batch.input_ids, batch.answer_mask)
    return targets.mean_logprob(logits[targets.positions])


def node_outputs(fwd, batch, ids=None):
    with torch.no_grad():
        _, out, _ = fwd(batch.input_ids if ids is None else ids, batch.attention_mask)
    return out


def gradients(fwd, batch, **kw):
    """{reader: dM/d(reader input)} per sample (the metric summed over the batch: samples are
    independent)."""
    logits, _, readers = fwd(batch.input_ids, batch.attention_mask, **kw)
    names = list(readers)
    grads = torch.autograd.grad(answer_logprob(logits, batch).sum(),
                                [readers[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(readers[n]) if g is None else g for n, g in zip(names, grads)}


def scores_from(fwd, graph, diff, grad_sum, n_passes, mask):
    """(B, E) edge scores: (z' - z) . mean gradient, summed over positions and hidden units."""
    m = mask[:, :, None].double()
    b = mask.shape[0]
    matrix = torch.zeros(b, graph.n_forward, graph.n_backward, dtype=torch.float64)
    # forward nodes in the EAP-IG index order, each (B, T, d)
    nodes = [diff["input"]]
    for layer in range(fwd.L):
        nodes += [diff[f"a{layer}"][:, :, h] for h in range(fwd.H)] + [diff[f"m{layer}"]]
    nodes = torch.stack(nodes, 1) * m[:, None]                       # (B, F, T, d)

    def put(n_up, col, grad):
        matrix[:, :n_up, col] = torch.einsum("bftd,btd->bf", nodes[:, :n_up], grad) / n_passes

    for layer in range(fwd.L):
        g = grad_sum[f"a{layer}"]                                      # (B, T, 3, H, d)
        for i in range(3):
            for h in range(fwd.H):
                put(graph.attention_readers_upstream(layer), graph.qkv_backward(layer, i, h),
                    g[:, :, i, h])
        put(graph.mlp_readers_upstream(layer), graph.mlp_backward(layer), grad_sum[f"m{layer}"])
    put(graph.n_forward, graph.logits_backward, grad_sum["logits"])
    return graph.from_matrix(matrix)


def add(total, new):
    return new if total is None else {k: total[k] + new[k] for k in total}


# --- the reference's algorithms, independently ---------------------------------------------------

def reference_eap(fwd, graph, batch, ablated):
    clean = node_outputs(fwd, batch)
    diff = {k: ablated[k] - clean[k] for k in clean}
    return scores_from(fwd, graph, diff, gradients(fwd, batch), 1, batch.attention_mask)


def reference_ig_inputs(fwd, graph, batch, corrupt_ids, m=STEPS):
    clean = node_outputs(fwd, batch)
    corrupt = node_outputs(fwd, batch, corrupt_ids)
    total = None
    for k in range(m):  # k = 0 .. m-1: the corrupted point in, the clean one out
        value = (corrupt["input"] + (k / m) * (clean["input"] - corrupt["input"])) \
            .detach().requires_grad_()
        total = add(total, gradients(fwd, batch, input_value=value))
    diff = {k_: corrupt[k_] - clean[k_] for k_ in clean}
    return scores_from(fwd, graph, diff, total, m, batch.attention_mask)


def reference_ig_activations(fwd, graph, batch, ablated, path_start, m=STEPS):
    clean = node_outputs(fwd, batch)
    total, passes = None, 0
    for group in fwd.groups():
        for k in range(1, m + 1):  # each group in turn, replaced by a constant
            alpha = k / m
            constant = (alpha * clean[group] + (1 - alpha) * path_start[group]).detach()
            total = add(total, gradients(fwd, batch, replace={group: constant}))
            passes += 1
    diff = {k_: ablated[k_] - clean[k_] for k_ in clean}
    return scores_from(fwd, graph, diff, total, passes, batch.attention_mask)


def cud_scores(lm, batch, ablation, method, z_base=None):
    settings = AttributionSettings(method, STEPS, "logprob", convention="reference")
    return attribute(ResidualRunner(lm.adapter), batch, ablation, settings, z_base=z_base)\
        .edge_scores.double()


def assert_equal_scores(ours, theirs):
    """Equal to float32 rounding: cud keeps edge scores in float32 (the model here is float64,
    so nothing else rounds)."""
    scale = theirs.abs().max().item()
    assert scale > 0
    assert (ours - theirs).abs().max().item() <= 1e-6 * scale, \
        (ours - theirs).abs().max().item() / scale


# --- the checks ------------------------------------------------------------------------------

def test_input_node_is_the_token_embedding_in_the_reference_convention(gpt2, batch):
    runner = ResidualRunner(gpt2.adapter)
    with torch.no_grad():
        cud = runner.run(batch.input_ids, batch.attention_mask, record=True).outputs
        ref = runner.run(batch.input_ids, batch.attention_mask, record=True,
                         token_input=True)
    tr = gpt2.model.transformer
    torch.testing.assert_close(ref.outputs[:, :, 0], tr.wte(batch.input_ids))
    torch.testing.assert_close(cud[:, :, 0] - ref.outputs[:, :, 0],
                               tr.wpe(torch.arange(batch.input_ids.shape[1]))[None]
                               .expand_as(cud[:, :, 0]))
    # the positions are a constant of the stream: the logits do not change
    plain = runner.run(batch.input_ids, batch.attention_mask).logits
    torch.testing.assert_close(ref.logits, plain)
    fwd = Forward(gpt2)
    torch.testing.assert_close(fwd(batch.input_ids, batch.attention_mask)[0], plain)


@pytest.mark.parametrize("intervention", ["patching", "zero", "mean"])
def test_eap_equals_the_reference(gpt2, batch, qa_samples, intervention):
    fwd, graph = Forward(gpt2), ResidualRunner(gpt2.adapter).graph
    if intervention == "patching":
        ablation = CorruptAblation(gpt2.tokenizer, seed=3)
        z = ablation.for_batch(ResidualRunner(gpt2.adapter), batch, token_input=True)
    elif intervention == "zero":
        ablation, z = ZeroAblation(), None
    else:
        ablation, z = _mean(gpt2, qa_samples), None
    ablated = _ablated(fwd, batch, ablation, gpt2)
    theirs = reference_eap(fwd, graph, batch, ablated)
    assert_equal_scores(cud_scores(gpt2, batch, ablation, "eap", z), theirs)


def test_eap_ig_inputs_equals_the_reference(gpt2, batch):
    runner = ResidualRunner(gpt2.adapter)
    ablation = CorruptAblation(gpt2.tokenizer, seed=4)
    from cud.circuits.ablation import corrupt_input_ids
    vocab = gpt2.model.get_input_embeddings().weight.shape[0]
    corrupt_ids = corrupt_input_ids(batch, min(vocab, len(gpt2.tokenizer)),
                                    gpt2.tokenizer.all_special_ids, seed=4)
    theirs = reference_ig_inputs(Forward(gpt2), runner.graph, batch, corrupt_ids)
    assert_equal_scores(cud_scores(gpt2, batch, ablation, "eap-ig-inputs"), theirs)
    # cud's own convention integrates k = 1..m: a different number, which the test sees
    own = attribute(runner, batch, ablation,
                    AttributionSettings("eap-ig-inputs", STEPS, "logprob")).edge_scores.double()
    assert (own - theirs).abs().max() > 1e-3 * theirs.abs().max()


@pytest.mark.parametrize("intervention", ["patching", "zero", "mean"])
def test_eap_ig_activations_by_layer_equals_the_reference(gpt2, batch, qa_samples,
                                                           intervention):
    fwd, runner = Forward(gpt2), ResidualRunner(gpt2.adapter)
    if intervention == "patching":
        ablation = CorruptAblation(gpt2.tokenizer, seed=5)
    elif intervention == "zero":
        ablation = ZeroAblation()
    else:
        ablation = _mean(gpt2, qa_samples)
    ablated = _ablated(fwd, batch, ablation, gpt2)
    # the reference's path starts at the corrupted run, or at 0 for zero and mean
    start = ablated if intervention == "patching" else \
        {k: torch.zeros_like(v) for k, v in ablated.items()}
    theirs = reference_ig_activations(fwd, runner.graph, batch, ablated, start)
    assert_equal_scores(cud_scores(gpt2, batch, ablation, "eap-ig-activations-by-layer"),
                        theirs)


def test_reference_convention_settings():
    with pytest.raises(ConfigError, match="one node group at a time"):
        AttributionSettings("eap-ig-activations", convention="reference")
    with pytest.raises(ConfigError, match="unknown convention"):
        AttributionSettings(convention="tl")
    ref = AttributionSettings("eap-ig-inputs", 5, convention="reference")
    assert ref.alphas == [0.0, 0.2, 0.4, 0.6, 0.8]
    by_layer = AttributionSettings("eap-ig-activations-by-layer", 5, convention="reference")
    assert by_layer.n_passes(2) == 5 * 5
    assert AttributionSettings("eap-ig-activations-by-layer", 5).n_passes(2) == 5 * 4 + 1
    from cud.circuits.settings import CircuitSettings
    with pytest.raises(ConfigError, match="corrupted input"):
        CircuitSettings(method="eap-ig-inputs", convention="reference", ablation="zero")


# --- helpers -----------------------------------------------------------------------------------

def _mean(lm, qa_samples):
    """The mean ablation over equal-length reference sequences: the reference averages over
    every position of a padded batch, cud over real tokens; without padding they agree."""
    enc = [e for e in encode_samples(lm.tokenizer, qa_samples)]
    length = len(enc[0])
    same = [e for e in enc if len(e) == length] or enc[:1]
    ref = [collate(same, lm.pad_token_id)]
    return MeanAblation.fit(ResidualRunner(lm.adapter), ref, token_input=True)


def _ablated(fwd, batch, ablation, lm):
    """The ablation's node outputs in the test's own layout (from cud's (B, T, F, d) tensor,
    which the patching test checks against the test's corrupted forward)."""
    runner = ResidualRunner(lm.adapter)
    z = ablation.for_batch(runner, batch, token_input=True)
    b, t = batch.input_ids.shape
    z = z.expand(b, t, runner.graph.n_forward, lm.adapter.d_model)
    g = runner.graph
    out = {"input": z[:, :, 0]}
    for layer in range(fwd.L):
        h0 = g.head_forward(layer, 0)
        out[f"a{layer}"] = z[:, :, h0:h0 + fwd.H]
        out[f"m{layer}"] = z[:, :, g.mlp_forward(layer)]
    if isinstance(ablation, CorruptAblation):  # the corrupted run, in the test's own forward
        from cud.circuits.ablation import corrupt_input_ids
        vocab = lm.model.get_input_embeddings().weight.shape[0]
        ids = corrupt_input_ids(batch, min(vocab, len(lm.tokenizer)),
                                lm.tokenizer.all_special_ids, seed=ablation.seed)
        theirs = node_outputs(fwd, batch, ids)
        for k in out:
            torch.testing.assert_close(out[k], theirs[k])
    return out
