"""Architecture adapters: the runner's residual-stream view computes exactly what the Hugging Face
model computes, for every family and variant the adapters claim (METHOD §1)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import other_model

from cud.circuits.runner import EdgePatch, ResidualRunner
from cud.data import collate, encode_samples
from cud.errors import ModelError
from cud.models import adapter_for, supported_model_types

pytestmark = pytest.mark.usefixtures("single_thread")

#: fp32 agreement asked of the adapters, on logits of order 1 (randomised weights)
ATOL = 1e-4


def hf_logits(lm, batch, **kwargs):
    with torch.no_grad():
        return lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                        **kwargs)


def max_diff_on_real_tokens(a, b, mask):
    return (a - b)[mask].abs().max().item()


def test_variants_are_what_they_claim(make_lm, randomise):
    """Guards the parametrisation: grouped-query attention and q/k/v biases are really there."""
    gqa = make_lm("llama").model.config
    assert gqa.num_key_value_heads < gqa.num_attention_heads
    for lm in (make_lm("llama", attention_bias=True, mlp_bias=True),
               other_model("qwen2", randomise)):
        attn = lm.model.model.layers[0].self_attn
        assert attn.q_proj.bias is not None and attn.q_proj.bias.abs().max() > 0.01


def test_runner_reproduces_hf_logits(variant_lm, padded_batch):
    lm, batch = variant_lm, padded_batch
    runner = ResidualRunner(lm.adapter)
    g = runner.graph
    mask = batch.attention_mask
    reference = hf_logits(lm, batch).logits
    assert reference[mask].std() > 0.1  # randomised weights: logits far from uniform

    with torch.no_grad():
        plain = runner.run(batch.input_ids, mask).logits
        recorded = runner.run(batch.input_ids, mask, record=True)
        # keep = 1 everywhere: the baseline must not leak in, whatever it is
        baseline = torch.randn(1, 1, g.n_forward, g.d_model, generator=torch.Generator()
                               .manual_seed(1))
        patched = runner.run(batch.input_ids, mask,
                             patch=EdgePatch(keep=g.to_matrix(torch.ones(1, g.n_edges)),
                                             baseline=baseline)).logits
        selected = runner.run(batch.input_ids, mask, logit_mask=mask).logits

    assert plain.shape == reference.shape
    for name, logits in [("plain", plain), ("recording", recorded.logits), ("patched", patched)]:
        diff = max_diff_on_real_tokens(logits, reference, mask)
        assert diff <= ATOL, f"{name} run differs from HF by {diff:.2e}"
    assert selected.shape == (int(mask.sum()), reference.shape[-1])
    assert (selected - reference[mask]).abs().max().item() <= ATOL


def test_recorded_outputs_rebuild_the_hf_residual_stream(variant_lm, padded_batch):
    """The input node plus every head and MLP of layers < l (plus attention output biases) is
    HF's hidden state entering layer l: the node outputs are a decomposition of the stream."""
    lm, batch = variant_lm, padded_batch
    runner = ResidualRunner(lm.adapter)
    g, a = runner.graph, lm.adapter
    hidden = hf_logits(lm, batch, output_hidden_states=True).hidden_states
    with torch.no_grad():
        outputs = runner.run(batch.input_ids, batch.attention_mask, record=True).outputs
    assert outputs.shape == (*batch.input_ids.shape, g.n_forward, g.d_model)
    for layer in range(a.n_layers):  # HF's last hidden state is after the final norm
        resid = outputs[:, :, :g.attention_readers_upstream(layer)].sum(2)
        for earlier in range(layer):
            if a.attention_bias(earlier) is not None:
                resid = resid + a.attention_bias(earlier)
        diff = max_diff_on_real_tokens(resid, hidden[layer], batch.attention_mask)
        assert diff <= ATOL, f"residual entering layer {layer} differs by {diff:.2e}"


def _attention_out_proj(lm, layer: int) -> torch.nn.Module:
    model_type = lm.model.config.model_type
    if model_type in ("llama", "mistral", "qwen2"):
        return lm.model.model.layers[layer].self_attn.o_proj
    if model_type == "gpt2":
        return lm.model.transformer.h[layer].attn.c_proj
    return lm.model.gpt_neox.layers[layer].attention.dense


def _mlp(lm, layer: int) -> torch.nn.Module:
    model_type = lm.model.config.model_type
    if model_type == "gpt2":
        return lm.model.transformer.h[layer].mlp
    if model_type == "gpt_neox":
        return lm.model.gpt_neox.layers[layer].mlp
    return lm.model.model.layers[layer].mlp


def test_removing_a_node_in_hf_equals_patching_its_outgoing_edges(variant_lm, padded_batch):
    """Zeroing one head's slice of the output projection's input (or one MLP's output) inside
    HF gives the logits of the runner with every edge out of that node patched to the zero
    baseline: node indices, head order and the patch arithmetic agree with the real model."""
    lm, batch = variant_lm, padded_batch
    runner = ResidualRunner(lm.adapter)
    g, a = runner.graph, lm.adapter
    mask = batch.attention_mask
    zero = torch.zeros(1, 1, g.n_forward, g.d_model)
    clean = hf_logits(lm, batch).logits
    last = a.n_layers - 1
    nodes = [("head", 0, 0), ("head", 0, a.n_heads - 1), ("head", last, 1), ("mlp", 0, None),
             ("mlp", last, None)]
    for kind, layer, head in nodes:
        if kind == "head":
            forward = g.head_forward(layer, head)
            span = slice(head * a.head_dim, (head + 1) * a.head_dim)

            def hook(module, args, span=span):
                x = args[0].clone()
                x[..., span] = 0
                return (x,)

            handle = _attention_out_proj(lm, layer).register_forward_pre_hook(hook)
        else:
            forward = g.mlp_forward(layer)
            handle = _mlp(lm, layer).register_forward_hook(lambda m, i, out: torch.zeros_like(out))
        try:
            reference = hf_logits(lm, batch).logits
        finally:
            handle.remove()
        keep = torch.ones(1, g.n_edges)
        keep[0, torch.as_tensor(g.edge_parent == forward)] = 0
        with torch.no_grad():
            patched = runner.run(batch.input_ids, mask,
                                 patch=EdgePatch(keep=g.to_matrix(keep), baseline=zero)).logits
        name = g.forward_names[forward]
        assert max_diff_on_real_tokens(reference, clean, mask) > 100 * ATOL, \
            f"removing {name} changes nothing; the comparison would be vacuous"
        diff = max_diff_on_real_tokens(patched, reference, mask)
        assert diff <= ATOL, f"removing {name}: runner and HF differ by {diff:.2e}"


def test_graph_follows_the_adapter(variant_lm):
    a = variant_lm.adapter
    g = ResidualRunner(a).graph
    cfg = variant_lm.model.config
    assert g.n_layers == cfg.num_hidden_layers
    assert g.n_heads == cfg.num_attention_heads  # query heads: k and v are ungrouped
    assert g.d_model == cfg.hidden_size
    assert g.parallel_attn_mlp == bool(getattr(cfg, "use_parallel_residual", False))


def test_supported_model_types_and_unsupported_ones():
    assert {"llama", "mistral", "qwen2", "gpt2", "gpt_neox"} <= set(supported_model_types())
    with pytest.raises(ModelError, match="unsupported architecture 'opt'.*llama"):
        adapter_for(SimpleNamespace(config=SimpleNamespace(model_type="opt")))


def test_mistral_sliding_window_shorter_than_the_sequence(qa_samples, randomise):
    lm = other_model("mistral", randomise, sliding_window=16)
    batch = collate(encode_samples(lm.tokenizer, qa_samples[:4]), lm.pad_token_id)
    assert batch.input_ids.shape[1] > 16
    with torch.no_grad():
        ours = ResidualRunner(lm.adapter).run(batch.input_ids, batch.attention_mask).logits
    diff = max_diff_on_real_tokens(ours, hf_logits(lm, batch).logits, batch.attention_mask)
    assert diff <= ATOL, f"runner and HF differ by {diff:.2e} with a sliding window"


def test_qwen2_sliding_window_on_some_layers_only(qa_samples, randomise):
    lm = other_model("qwen2", randomise, use_sliding_window=True, sliding_window=12,
                     max_window_layers=1)
    assert lm.adapter.sliding_layers and len(lm.adapter.sliding_layers) < lm.adapter.n_layers
    batch = collate(encode_samples(lm.tokenizer, qa_samples[:4]), lm.pad_token_id)
    assert batch.input_ids.shape[1] > 12
    with torch.no_grad():
        ours = ResidualRunner(lm.adapter).run(batch.input_ids, batch.attention_mask).logits
    diff = max_diff_on_real_tokens(ours, hf_logits(lm, batch).logits, batch.attention_mask)
    assert diff <= ATOL, f"runner and HF differ by {diff:.2e} with a per-layer sliding window"


# The pieces the runner composes --------------------------------------------------------------
def test_reader_norm_writes_out_the_models_norm(variant_lm):
    """The shared capture applies the norm's Jacobian from this description: it must be the
    model's own norm, weight, bias and eps included."""
    a = variant_lm.adapter
    x = 3 * torch.randn(2, 5, a.d_model, generator=torch.Generator().manual_seed(0)) + 0.5
    for layer in range(a.n_layers):
        norm = a.reader_norm(layer)
        assert norm is not None
        with torch.no_grad():
            expected = a.attention_norm(layer)(x)
            torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)
            x_hat, r = norm.normalize(x)
            assert r.shape == (2, 5, 1) and (r > 0).all()
            torch.testing.assert_close(x_hat.pow(2).mean(-1), torch.ones(2, 5), rtol=1e-3,
                                       atol=0)


def test_project_qkv_is_the_per_head_weights(variant_lm):
    """The fused (grouped) projection the shared capture runs equals q, k, v per query head
    from ``qkv_weights``, which the gradients and the per-head patched path use."""
    a = variant_lm.adapter
    y = torch.randn(2, 5, a.d_model, generator=torch.Generator().manual_seed(1))
    for layer in range(a.n_layers):
        weight, bias = a.qkv_weights(layer)
        assert weight.shape == (3, a.n_heads, a.d_model, a.head_dim)
        with torch.no_grad():
            expected = torch.einsum("btd,khde->btkhe", y, weight)
            if bias is not None:
                expected = expected + bias
            for i, got in enumerate(a.project_qkv(layer, y)):
                assert got.shape == (2, 5, a.n_heads, a.head_dim)
                torch.testing.assert_close(got, expected[:, :, i], rtol=1e-5, atol=1e-5)


def test_attention_output_is_the_sum_of_the_heads(variant_lm, padded_batch):
    a, batch = variant_lm.adapter, padded_batch
    ctx = a.context(batch.attention_mask)
    x = a.embed(batch.input_ids)
    with torch.no_grad():
        o = a.attention_values(0, x, ctx)
        heads = a.attention_heads(0, x, ctx)
        torch.testing.assert_close(a.attention_output(0, o), heads.sum(2), rtol=1e-5, atol=1e-5)
        # every head reading its own copy of the same stream changes nothing
        copies = x[:, :, None, None].expand(*x.shape[:2], 3, a.n_heads, a.d_model)
        torch.testing.assert_close(a.attention_heads(0, copies, ctx), heads, rtol=1e-5,
                                   atol=1e-5)
