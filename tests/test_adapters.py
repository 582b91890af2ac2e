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
    if model_type in ("llama", "mistral", "qwen2", "phi3", "qwen3", "gemma"):
        return lm.model.model.layers[layer].self_attn.o_proj
    if model_type == "phi":
        return lm.model.model.layers[layer].self_attn.dense
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


def assert_removal_matches(runner, batch, forward: int, reference, clean, what: str) -> float:
    """The runner with every edge out of node ``forward`` patched to the zero baseline gives
    ``reference`` (the logits of ``what`` with that node removed), which must differ from the
    ``clean`` logits (else the comparison is vacuous); returns the largest difference."""
    g, mask = runner.graph, batch.attention_mask
    zero = torch.zeros(1, 1, g.n_forward, g.d_model)
    keep = torch.ones(1, g.n_edges)
    keep[0, torch.as_tensor(g.edge_parent == forward)] = 0
    with torch.no_grad():
        patched = runner.run(batch.input_ids, mask,
                             patch=EdgePatch(keep=g.to_matrix(keep), baseline=zero)).logits
    name = g.forward_names[forward]
    assert max_diff_on_real_tokens(reference, clean, mask) > 100 * ATOL, \
        f"removing {name} changes nothing; the comparison would be vacuous"
    diff = max_diff_on_real_tokens(patched, reference, mask)
    assert diff <= ATOL, f"removing {name}: runner and {what} differ by {diff:.2e}"
    return diff


def test_removing_a_node_in_hf_equals_patching_its_outgoing_edges(variant_lm, padded_batch):
    """Zeroing one head's slice of the output projection's input (or one MLP's output) inside
    HF gives the logits of the runner with every edge out of that node patched to the zero
    baseline: node indices, head order and the patch arithmetic agree with the real model."""
    lm, batch = variant_lm, padded_batch
    runner = ResidualRunner(lm.adapter)
    g, a = runner.graph, lm.adapter
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
        assert_removal_matches(runner, batch, forward, reference, clean, "HF")


def test_graph_follows_the_adapter(variant_lm):
    a = variant_lm.adapter
    g = ResidualRunner(a).graph
    cfg = variant_lm.model.config
    assert g.n_layers == cfg.num_hidden_layers
    assert g.n_heads == cfg.num_attention_heads  # query heads: k and v are ungrouped
    assert g.d_model == cfg.hidden_size
    parallel = cfg.model_type == "phi" or bool(getattr(cfg, "use_parallel_residual", False))
    assert g.parallel_attn_mlp == parallel


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


# Phi, Phi-3, Qwen3, Gemma ------------------------------------------------------------------
def test_new_families_are_registered():
    assert {"phi", "phi3", "qwen3", "gemma"} <= set(supported_model_types())


def test_new_family_variants_are_what_they_claim(make_lm):
    """Guards the parametrisation of the new families: what each variant is named after is
    really in the model (and randomised, so that a misplaced piece would show)."""
    phi = make_lm("phi")
    assert phi.adapter.rotary_ndims == phi.adapter.head_dim // 2
    assert make_lm("phi", partial_rotary_factor=1.0).adapter.rotary_ndims == phi.adapter.head_dim
    attn = make_lm("phi", qk_layernorm=True).model.model.layers[0].self_attn
    assert attn.q_layernorm.weight.shape == (phi.adapter.head_dim,)
    assert (attn.q_layernorm.weight - 1).abs().max() > 0.01
    assert attn.q_proj.bias.abs().max() > 0.01 and phi.model.lm_head.bias.abs().max() > 0.01
    assert make_lm("phi", num_key_value_heads=2).adapter.n_kv_heads == 2

    phi3 = make_lm("phi3")
    assert phi3.adapter.n_kv_heads == phi3.adapter.n_heads
    assert make_lm("phi3", num_key_value_heads=2).adapter.n_kv_heads == 2
    assert phi3.adapter.rotary(3, torch.device("cpu"))[0].shape[-1] == phi3.adapter.head_dim
    half = make_lm("phi3", partial_rotary_factor=0.5)
    cos, _ = half.adapter.rotary(3, torch.device("cpu"))
    assert cos.shape[-1] == half.adapter.head_dim // 2
    window = make_lm("phi3", sliding_window=12).adapter
    assert window.window == 12 and window.sliding_layers == frozenset(range(window.n_layers))

    qwen3 = make_lm("qwen3", head_dim=16)
    cfg = qwen3.model.config
    assert qwen3.adapter.head_dim == 16 != cfg.hidden_size // cfg.num_attention_heads
    assert (qwen3.model.model.layers[0].self_attn.q_norm.weight - 1).abs().max() > 0.01
    sliding = make_lm("qwen3", use_sliding_window=True, sliding_window=12, max_window_layers=1)
    assert sliding.adapter.sliding_layers == frozenset({1})

    gemma = make_lm("gemma")
    cfg = gemma.model.config
    assert gemma.adapter.n_kv_heads == 1
    assert gemma.adapter.head_dim * gemma.adapter.n_heads != cfg.hidden_size
    assert gemma.model.lm_head.weight is gemma.model.model.embed_tokens.weight


def assert_runner_follows_hf_in_both(a, b, batch):
    """``a`` and ``b`` have the very same weights, their HF logits differ on ``batch`` (so the
    changed setting is really computed), and the runner reproduces HF's logits in both."""
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    mask = batch.attention_mask
    ref_a, ref_b = hf_logits(a, batch).logits, hf_logits(b, batch).logits
    assert max_diff_on_real_tokens(ref_a, ref_b, mask) > 100 * ATOL
    for lm, reference in ((a, ref_a), (b, ref_b)):
        with torch.no_grad():
            ours = ResidualRunner(lm.adapter).run(batch.input_ids, mask).logits
        assert max_diff_on_real_tokens(ours, reference, mask) <= ATOL


@pytest.mark.parametrize("family, window", [
    ("phi3", {"sliding_window": 12}),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 12, "max_window_layers": 1})])
def test_sliding_window_shorter_than_the_sequence_changes_the_logits(family, window, make_lm,
                                                                     qa_samples):
    """The window variants are the default models' very weights with a window: the window must
    change HF's logits (else the variant tests nothing), and the runner follows HF in both."""
    full, windowed = make_lm(family), make_lm(family, **window)
    batch = collate(encode_samples(full.tokenizer, qa_samples[:4]), full.pad_token_id)
    assert batch.input_ids.shape[1] > 12
    assert_runner_follows_hf_in_both(full, windowed, batch)


def test_phi_block_is_parallel_with_one_shared_norm(make_lm, qa_samples):
    """Phi's MLP reads the layer's input_layernorm output, as its attention does: the MLP node
    has no edges from its own layer's heads, and the adapter's MLP on the residual entering
    the layer is exactly what HF's MLP computes (its input captured by a hook)."""
    lm = make_lm("phi")
    g = ResidualRunner(lm.adapter).graph
    assert g.parallel_attn_mlp
    assert "a0.h0->m0" not in g.edge_lookup and "a0.h0->m1" in g.edge_lookup
    batch = collate(encode_samples(lm.tokenizer, qa_samples[:2]), lm.pad_token_id)
    seen = {}
    block = lm.model.model.layers[1]
    handles = [block.mlp.register_forward_hook(lambda m, i, out: seen.update(mlp=out)),
               block.self_attn.q_proj.register_forward_hook(
                   lambda m, i, out: seen.update(attn_in=i[0]))]
    try:
        hidden = hf_logits(lm, batch, output_hidden_states=True).hidden_states
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        norm_out = lm.adapter.attention_norm(1)(hidden[1])
        mlp_out = lm.adapter.mlp(1, hidden[1])
    assert torch.equal(norm_out, seen["attn_in"])
    torch.testing.assert_close(mlp_out, seen["mlp"], rtol=0, atol=1e-6)


def test_gemma_input_node_is_the_scaled_embedding_in_the_models_dtype(randomise):
    """Gemma's input node is embedding * sqrt(d), the factor rounded to the model's dtype as
    HF does (in bfloat16 sqrt(32) = 5.656... becomes 5.65625): exactly HF's first hidden state."""
    from cud.models import tiny_model
    ids = torch.arange(5, 25).view(2, 10)
    for dtype in (torch.float32, torch.bfloat16):
        lm = tiny_model("gemma")
        randomise(lm.model)
        lm.model.to(dtype)
        a = lm.adapter
        scale = torch.tensor(a.d_model ** 0.5, dtype=dtype)
        if dtype == torch.bfloat16:
            assert scale.item() != a.d_model ** 0.5
        with torch.no_grad():
            ours = a.embed(ids)
            hidden = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[0]
        assert ours.dtype == dtype
        assert torch.equal(ours, lm.model.model.embed_tokens.weight[ids] * scale)
        assert torch.equal(ours, hidden)


def test_gemma_reader_norm_has_the_effective_weight(make_lm):
    a = make_lm("gemma").adapter
    norm = a.reader_norm(0)
    stored = a.layers[0].input_layernorm.weight
    assert norm.kind == "rms" and norm.bias is None
    torch.testing.assert_close(norm.weight, 1 + stored, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["phi3", "qwen3", "gemma"])
def test_wide_rms_norms_are_hfs_norms(family, randomise):
    """The RMSNorms of the Llama-like new families are HF's own computation, bit for bit, in
    float32 and bfloat16; in float64 they stay in float64 where HF's modules round through
    float32 (so float64 gradient checks are exact), and are then the closer to the float64 truth."""
    from cud.models import tiny_model
    from cud.models.adapters.qwen3 import WideRMSNorm
    gen = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(2, 7, 32, generator=gen, dtype=torch.float64) + 0.5
    lm = tiny_model(family)
    randomise(lm.model)
    a = lm.adapter
    modules = [a.layers[0].input_layernorm, a.layers[1].post_attention_layernorm, a.backbone.norm]
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        lm.model.to(dtype)
        for module in modules:
            ours = WideRMSNorm(module, a.unit_offset_norms)
            with torch.no_grad():
                got, hf = ours(x.to(dtype)), module(x.to(dtype))
            assert got.dtype == hf.dtype == dtype
            if dtype != torch.float64:
                assert torch.equal(got, hf)
            else:
                w = module.weight + 1 if a.unit_offset_norms else module.weight
                exact = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + ours.eps) * w
                assert (got - exact).abs().max() < 1e-12 < (hf - exact).abs().max()


def test_phi3_longrope_beyond_the_original_context(qa_samples, randomise):
    """Phi-3's longrope tables come from the model's own rotary module: past
    ``original_max_position_embeddings`` (32 here) it switches to the long factors, and the
    runner follows HF on both sides of that switch."""
    from cud.models import tiny_model
    rope = {"rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 4.0, 6.0, 9.0]}
    cos = {}
    for original in (32, 256):
        lm = tiny_model("phi3", rope_parameters=dict(rope),
                        original_max_position_embeddings=original)
        randomise(lm.model)
        batch = collate(encode_samples(lm.tokenizer, qa_samples[:4]), lm.pad_token_id)
        assert (batch.input_ids.shape[1] > original) == (original == 32)
        with torch.no_grad():
            ours = ResidualRunner(lm.adapter).run(batch.input_ids, batch.attention_mask).logits
        reference = hf_logits(lm, batch).logits
        diff = max_diff_on_real_tokens(ours, reference, batch.attention_mask)
        assert diff <= ATOL, f"longrope (original context {original}): differs by {diff:.2e}"
        cos[original] = lm.adapter.rotary(batch.input_ids.shape[1], torch.device("cpu"))[0]
    assert not torch.allclose(cos[32], cos[256])  # the long factors were really used


# Post-norm families (OLMo 2, Gemma 2, Gemma 3) ---------------------------------------------------
# Their head nodes are shares w * o_h / r(sum_j o_j) of the layer's normalised attention output
# (cud.models.adapters.olmo2): the checks above that hold for any node definition are run on
# them as they are; node removal is checked against a direct implementation of that definition.
import test_reader_gradients as reader_gradient_checks


def _norm_eps(norm: torch.nn.Module) -> float:
    eps = getattr(norm, "variance_epsilon", None)
    return norm.eps if eps is None else eps


def test_post_norm_runner_reproduces_hf_logits(post_norm_lm, post_norm_batch):
    lm, batch = post_norm_lm, post_norm_batch
    test_runner_reproduces_hf_logits(lm, batch)
    with torch.no_grad():
        ours = ResidualRunner(lm.adapter).run(batch.input_ids, batch.attention_mask).logits
    diff = max_diff_on_real_tokens(ours, hf_logits(lm, batch).logits, batch.attention_mask)
    print(f"{lm.model.config.model_type} logits max |runner - HF| = {diff:.2e}")


def test_post_norm_recorded_outputs_rebuild_the_hf_residual_stream(post_norm_lm,
                                                                    post_norm_batch):
    test_recorded_outputs_rebuild_the_hf_residual_stream(post_norm_lm, post_norm_batch)


def test_post_norm_pieces(post_norm_lm, post_norm_batch):
    test_graph_follows_the_adapter(post_norm_lm)
    test_project_qkv_is_the_per_head_weights(post_norm_lm)
    test_attention_output_is_the_sum_of_the_heads(post_norm_lm, post_norm_batch)


def test_post_norm_patched_runs_follow_the_definition(post_norm_lm, post_norm_batch, randomise):
    reader_gradient_checks.test_patched_runs_follow_the_definition(post_norm_lm, post_norm_batch,
                                                                   randomise)


def hf_logits_without_node(lm, batch, layer: int, head: int | None):
    """HF's logits with one node removed, written directly with hooks on HF's modules: a head
    ``h`` of ``layer`` -> the post-attention norm's output minus that head's share
    ``w * o_h / r`` (``o_h`` its slice of ``o_proj``, ``r`` the RMS of the norm's input);
    ``head=None`` -> the layer's MLP node, the post-feedforward norm's output, set to zero."""
    block = lm.model.model.layers[layer]
    if head is None:
        handles = [block.post_feedforward_layernorm.register_forward_hook(
            lambda module, args, out: torch.zeros_like(out))]
    else:
        o_proj, norm = block.self_attn.o_proj, block.post_attention_layernorm
        e = lm.adapter.head_dim
        span = slice(head * e, (head + 1) * e)
        weight = norm.weight + 1 if getattr(lm.adapter, "unit_offset_norms", False) \
            else norm.weight
        seen = {}

        def keep_input(module, args):
            seen["o"] = args[0]

        def remove_share(module, args, out):
            total = args[0]  # o_proj's output: the sum of the raw heads
            o_h = seen["o"][..., span] @ o_proj.weight[:, span].T
            r_inv = torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + _norm_eps(norm))
            return out - weight * o_h * r_inv

        handles = [o_proj.register_forward_pre_hook(keep_input),
                   norm.register_forward_hook(remove_share)]
    try:
        return hf_logits(lm, batch).logits
    finally:
        for handle in handles:
            handle.remove()


def test_post_norm_removing_a_node_is_removing_its_share(post_norm_lm, post_norm_batch):
    """Every edge out of a node patched to the zero baseline gives the logits of HF with that
    node removed as the node definition says (heads: their share of the normalised sum)."""
    lm, batch = post_norm_lm, post_norm_batch
    runner = ResidualRunner(lm.adapter)
    g, a = runner.graph, lm.adapter
    clean = hf_logits(lm, batch).logits
    last = a.n_layers - 1
    worst = 0.0
    for layer, head in [(0, 0), (0, a.n_heads - 1), (last, 1), (0, None), (last, None)]:
        forward = g.mlp_forward(layer) if head is None else g.head_forward(layer, head)
        reference = hf_logits_without_node(lm, batch, layer, head)
        diff = assert_removal_matches(runner, batch, forward, reference, clean,
                                      "the direct removal")
        worst = max(worst, diff)
    print(f"{lm.model.config.model_type} node removal max |runner - direct| = {worst:.2e}")


def test_olmo2_q_norm_spans_all_heads_and_one_heads_q_input(make_lm, qa_samples):
    """OLMo 2's q_norm is one RMSNorm over all heads' q projections, so a head's q is a
    function of the whole projection of its q input: patching one edge into head 2's q input
    of layer 1 (from the input node, to a baseline u) is HF with q_norm's output for that
    head's slice taken from q_norm(q_proj(residual - embedding + u)), every other head's q and
    every other reader clean."""
    lm = make_lm("olmo2")
    a = lm.adapter
    attn = lm.model.model.layers[1].self_attn
    assert attn.q_norm.weight.shape == (a.n_heads * a.head_dim,)
    assert attn.k_norm.weight.shape == (a.n_kv_heads * a.head_dim,)
    assert a.reader_norm(0) is None and ResidualRunner(a).copies
    batch = collate(encode_samples(lm.tokenizer, qa_samples[:4]), lm.pad_token_id)
    mask = batch.attention_mask
    head, e = 2, a.head_dim
    span = slice(head * e, (head + 1) * e)
    u = 3 * torch.randn(a.d_model, generator=torch.Generator().manual_seed(0))
    seen = {}

    def keep_input(module, args, kwargs):
        seen["x"] = kwargs.get("hidden_states", args[0] if args else None)

    def splice(module, args, out):
        y = attn.q_proj(seen["x"] - lm.model.model.embed_tokens(batch.input_ids) + u)
        normed = module.weight * y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True)
                                                 + _norm_eps(module))
        out = out.clone()
        out[..., span] = normed[..., span]
        return out

    handles = [attn.register_forward_pre_hook(keep_input, with_kwargs=True),
               attn.q_norm.register_forward_hook(splice)]
    try:
        reference = hf_logits(lm, batch).logits
    finally:
        for handle in handles:
            handle.remove()
    runner = ResidualRunner(a)
    g = runner.graph
    keep = torch.ones(1, g.n_edges)
    keep[0, g.edge_lookup[f"input->a1.h{head}<q>"]] = 0
    baseline = torch.zeros(1, 1, g.n_forward, g.d_model)
    baseline[0, 0, 0] = u
    with torch.no_grad():
        patched = runner.run(batch.input_ids, mask, patch=EdgePatch(
            keep=g.to_matrix(keep), baseline=baseline)).logits
    clean = hf_logits(lm, batch).logits
    assert max_diff_on_real_tokens(reference, clean, mask) > 100 * ATOL
    diff = max_diff_on_real_tokens(patched, reference, mask)
    print(f"olmo2 one head's q input patched: max |runner - HF splice| = {diff:.2e}")
    assert diff <= ATOL


def test_olmo2_with_an_attention_output_bias_is_refused(randomise):
    from cud.models import tiny_model
    with pytest.raises(ModelError, match="output bias"):
        tiny_model("olmo2", attention_bias=True)


def test_post_norm_shared_capture_gives_the_gradients_of_copies(post_norm_lm, post_norm_batch):
    """Families with a norm in front of attention (Gemma 2 / 3) use the shared capture: the
    post-norm acts on the sum of heads, so each head's q/k/v gradient in the shared pass is its
    own. OLMo 2 has no such norm (q/k norms act on the projections): copies capture only."""
    lm, batch = post_norm_lm, post_norm_batch
    a = lm.adapter
    if lm.model.config.model_type == "olmo2":
        assert a.reader_norm(0) is None and ResidualRunner(a).copies
        return
    test_reader_norm_writes_out_the_models_norm(lm)
    for baseline in ("zero", "corrupt"):
        reader_gradient_checks.test_shared_capture_gives_the_gradients_of_copies(
            lm, batch, baseline, 2)
    reader_gradient_checks.test_shared_capture_gives_the_scores_of_copies(
        lm, batch, "eap-ig-activations")


# Gemma 2 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("change", [{"attn_logit_softcapping": 1.0},
                                    {"final_logit_softcapping": None},
                                    {"sliding_window": 16},
                                    {"query_pre_attn_scalar": 16}], ids=str)
def test_gemma2_pieces_each_change_the_logits(change, make_lm, qa_samples):
    """The default tiny Gemma 2 and the same weights with one piece changed (the attention
    soft cap 5 -> 1, the final one off, layer 0's window shorter than the batch, the query
    scalar = head_dim): HF's logits move,
    and the runner follows HF in both (so each piece is really computed, and computed right)."""
    default, changed = make_lm("gemma2"), make_lm("gemma2", **change)
    batch = collate(encode_samples(default.tokenizer, qa_samples[:4]), default.pad_token_id)
    assert default.adapter.sliding_layers == changed.adapter.sliding_layers == frozenset({0})
    assert batch.input_ids.shape[1] > 16
    assert_runner_follows_hf_in_both(default, changed, batch)


def test_gemma2_input_node_is_hfs_scaled_embedding(make_lm, qa_samples):
    lm = make_lm("gemma2")
    batch = collate(encode_samples(lm.tokenizer, qa_samples[:2]), lm.pad_token_id)
    hidden = hf_logits(lm, batch, output_hidden_states=True).hidden_states[0]
    with torch.no_grad():
        ours = lm.adapter.embed(batch.input_ids)
    scale = torch.tensor(lm.adapter.d_model ** 0.5)
    assert torch.equal(ours, lm.model.model.embed_tokens.weight[batch.input_ids] * scale)
    assert torch.equal(ours, hidden)


def test_gemma2_with_an_attention_output_bias_is_refused():
    from cud.models import tiny_model
    with pytest.raises(ModelError, match="output bias"):
        tiny_model("gemma2", attention_bias=True)


# Gemma 3 (text) ------------------------------------------------------------------------------
@pytest.mark.parametrize("change", [{"rope_local_base_freq": 1e6},
                                    {"sliding_window": 16},
                                    {"query_pre_attn_scalar": 1},
                                    {"final_logit_softcapping": 3.0}], ids=str)
def test_gemma3_pieces_each_change_the_logits(change, make_lm, qa_samples):
    """The default tiny Gemma 3 and the same weights with one piece changed (the local layer's
    rotary base = the global one, layer 0's window shorter than the batch, the query scalar
    24 -> 1, a final soft cap): HF's logits move, and the runner follows HF in both."""
    default, changed = make_lm("gemma3_text"), make_lm("gemma3_text", **change)
    assert default.adapter.local_layers == frozenset({0})
    batch = collate(encode_samples(default.tokenizer, qa_samples[:4]), default.pad_token_id)
    assert batch.input_ids.shape[1] > 16
    assert_runner_follows_hf_in_both(default, changed, batch)


def test_gemma3_local_and_global_rotary_tables(make_lm):
    a = make_lm("gemma3_text").adapter
    ctx = a.context(torch.ones(1, 8, dtype=torch.bool))
    assert not torch.allclose(ctx.rotary[0], ctx.local_rotary[0])
    assert a._rotary(0, ctx) is ctx.local_rotary and a._rotary(1, ctx) is ctx.rotary
    q_norm = a.layers[0].self_attn.q_norm
    assert q_norm.weight.shape == (a.head_dim,) and q_norm.weight.abs().max() > 0.01


def test_gemma3_attention_soft_cap_is_ignored_as_by_hf(make_lm, qa_samples):
    """HF's Gemma 3 attention does not apply ``attn_logit_softcapping``; neither does the
    adapter (so that it reproduces HF)."""
    default, capped = make_lm("gemma3_text"), make_lm("gemma3_text", attn_logit_softcapping=1.0)
    batch = collate(encode_samples(default.tokenizer, qa_samples[:2]), default.pad_token_id)
    reference = hf_logits(default, batch).logits
    assert torch.equal(hf_logits(capped, batch).logits, reference)
    with torch.no_grad():
        ours = ResidualRunner(capped.adapter).run(batch.input_ids, batch.attention_mask).logits
    assert max_diff_on_real_tokens(ours, reference, batch.attention_mask) <= ATOL


def test_gemma3_bidirectional_is_refused():
    from cud.models import tiny_model
    with pytest.raises(ModelError, match="bidirectional"):
        tiny_model("gemma3_text", use_bidirectional_attention=True)


@pytest.mark.parametrize("family", ["olmo2", "gemma2", "gemma3_text"])
def test_post_norm_families_norms_are_hfs_norms(family, randomise):
    """Every RMSNorm the post-norm adapters compute (post-attention and post-feedforward norms,
    q/k norms, the final norm) is HF's module bit for bit in float32 and bfloat16."""
    from cud.models import tiny_model
    lm = tiny_model(family)
    randomise(lm.model)
    a = lm.adapter
    block = a.layers[1]
    modules = [block.post_attention_layernorm, block.post_feedforward_layernorm, a.backbone.norm]
    if family != "olmo2":
        modules += [block.input_layernorm, block.pre_feedforward_layernorm]
    widths = {id(m): m.weight.shape[0] for m in modules}
    if hasattr(block.self_attn, "q_norm"):
        modules += [block.self_attn.q_norm, block.self_attn.k_norm]
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        lm.model.to(dtype)
        for module in modules:
            x = (3 * torch.randn(2, 7, module.weight.shape[0], generator=gen) + 0.5).to(dtype)
            ours = a._norm(module)
            with torch.no_grad():
                got, hf = ours(x), module(x)
            assert got.dtype == hf.dtype == dtype and torch.equal(got, hf), (module, dtype)
    assert all(width == a.d_model for width in widths.values())
