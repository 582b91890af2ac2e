"""Shared fixtures: tiny models of the families (built in memory, cached per session), every
variant the adapters claim, and a few QA samples of different lengths."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

from cud.data import collate, encode_samples, fictitious_authors
from cud.models import prepare, tiny_model, tiny_tokenizer

FAMILIES = ("llama", "gpt2", "gpt_neox", "phi", "phi3", "qwen3", "gemma", "olmo2", "gemma2",
            "gemma3_text")


def randomise_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Add N(0, scale^2) noise to every parameter, in place.

    Fresh HF models have zero biases, unit norm weights and near-uniform attention, which would
    hide a misplaced bias, norm or mask; the noise makes every parameter matter.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
    return model


@pytest.fixture(scope="session")
def randomise():
    """The function :func:`randomise_`, for tests that build their own models."""
    return randomise_


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models run fastest on one thread, and 2 shared cores thrash with more."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def make_lm():
    """``make_lm(family, dtype=torch.float32, randomised=True, **overrides)`` -> a cached
    LoadedModel. Shared between tests: never modify the model you get."""
    cache = {}

    def make(family: str, dtype: torch.dtype = torch.float32, randomised: bool = True,
             **overrides):
        key = (family, dtype, randomised, tuple(sorted(overrides.items())))
        if key not in cache:
            lm = tiny_model(family, seed=0, **overrides)
            if randomised:
                randomise_(lm.model)
            lm.model.to(dtype)
            cache[key] = lm
        return cache[key]

    return make


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def qa_samples():
    """Ten built-in samples; the first four have four different token lengths."""
    return fictitious_authors(10, seed=0)


#: name -> (family, config overrides) of the variants the adapters claim. The llama default has
#: grouped-query attention (4 query heads, 2 key/value heads).
VARIANTS = {
    "llama-gqa": ("llama", {}),
    "llama-mqa": ("llama", {"num_key_value_heads": 1}),
    "llama-mha": ("llama", {"num_key_value_heads": 4}),
    "llama-qkv-o-mlp-bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama-head-dim-16": ("llama", {"head_dim": 16}),
    "llama-tied-embeddings": ("llama", {"tie_word_embeddings": True}),
    "llama-3-layers": ("llama", {"num_hidden_layers": 3}),
    "gpt2": ("gpt2", {}),
    "gpt2-layer-scaled-attention": ("gpt2", {"scale_attn_by_inverse_layer_idx": True}),
    "gpt2-3-layers": ("gpt2", {"n_layer": 3}),
    "gpt_neox-parallel": ("gpt_neox", {}),
    "gpt_neox-sequential": ("gpt_neox", {"use_parallel_residual": False}),
    "gpt_neox-full-rotary": ("gpt_neox", {"rotary_pct": 1.0}),
    "gpt_neox-3-layers": ("gpt_neox", {"num_hidden_layers": 3}),
    # phi default: parallel block, partial rotary (factor 0.5), multi-head attention
    "phi-partial-rotary": ("phi", {}),
    "phi-full-rotary": ("phi", {"partial_rotary_factor": 1.0}),
    "phi-qk-layernorm": ("phi", {"qk_layernorm": True}),
    "phi-gqa": ("phi", {"num_key_value_heads": 2}),
    # phi3 default: multi-head attention (Phi-3-mini), full rotary, no window
    "phi3-mha": ("phi3", {}),
    "phi3-gqa": ("phi3", {"num_key_value_heads": 2}),  # Phi-3-medium, Phi-4-mini
    "phi3-partial-rotary": ("phi3", {"partial_rotary_factor": 0.5}),
    "phi3-sliding-window-12": ("phi3", {"sliding_window": 12}),  # shorter than the batch
    # qwen3 default: grouped-query attention, head_dim 8 = 32 / 4
    "qwen3-gqa": ("qwen3", {}),
    "qwen3-head-dim-16": ("qwen3", {"head_dim": 16}),
    "qwen3-qkv-o-bias": ("qwen3", {"attention_bias": True}),
    "qwen3-sliding-window-layer-1": ("qwen3", {"use_sliding_window": True, "sliding_window": 12,
                                               "max_window_layers": 1}),
    # gemma default: multi-query attention, head_dim 16 (4 x 16 != 32), tied embeddings
    "gemma-mqa": ("gemma", {}),
    "gemma-mha": ("gemma", {"num_key_value_heads": 4}),
}

#: name -> (family, config overrides) of the post-norm families' variants. Kept apart from
#: VARIANTS: their head nodes are shares of a normalised sum (see cud.models.adapters.olmo2), so
#: zeroing a head's slice of the output projection inside HF is not removing that node, and
#: test_adapters.py checks them with a direct implementation of node removal instead.
POST_NORM_VARIANTS = {
    # olmo2 default: grouped-query attention, q_norm / k_norm over the whole projections
    "olmo2-gqa": ("olmo2", {}),
    "olmo2-mha": ("olmo2", {"num_key_value_heads": 4}),
    "olmo2-mqa": ("olmo2", {"num_key_value_heads": 1}),
    # gemma2 default: grouped-query, head_dim 16, query_pre_attn_scalar 24, soft-capped
    # attention and logits, layer 0 a sliding-window layer with a window longer than the batch
    "gemma2-gqa": ("gemma2", {}),
    "gemma2-window-16": ("gemma2", {"sliding_window": 16}),  # shorter than the batch
    "gemma2-mqa": ("gemma2", {"num_key_value_heads": 1}),
    "gemma2-no-softcap": ("gemma2", {"attn_logit_softcapping": None,
                                     "final_logit_softcapping": None}),
    "gemma2-3-layers-window-12": ("gemma2", {"num_hidden_layers": 3, "sliding_window": 12}),
    # gemma3_text default: grouped-query, per-head q/k norms, layer 0 local (base 10^4, window
    # longer than the batch), layer 1 global (base 10^6), no soft caps
    "gemma3_text-gqa": ("gemma3_text", {}),
    "gemma3_text-window-16": ("gemma3_text", {"sliding_window": 16}),
    "gemma3_text-mqa": ("gemma3_text", {"num_key_value_heads": 1}),
    "gemma3_text-final-softcap": ("gemma3_text", {"final_logit_softcapping": 3.0}),
    "gemma3_text-3-layers-window-12": ("gemma3_text", {
        "num_hidden_layers": 3, "sliding_window": 12,
        "layer_types": ("sliding_attention", "sliding_attention", "full_attention")}),
}


@pytest.fixture(params=list(POST_NORM_VARIANTS))
def post_norm_lm(request, make_lm):
    """A randomised tiny model of every post-norm variant the adapters claim."""
    family, overrides = POST_NORM_VARIANTS[request.param]
    return make_lm(family, **overrides)


@pytest.fixture
def post_norm_batch(post_norm_lm, qa_samples):
    """Four samples of four different lengths, right-padded."""
    batch = collate(encode_samples(post_norm_lm.tokenizer, qa_samples[:4]),
                    post_norm_lm.pad_token_id)
    assert len(set(batch.attention_mask.sum(1).tolist())) == 4
    return batch


#: Other HF model types the llama adapter claims (tiny_model only builds LlamaConfig).
OTHER_TYPES = {
    "mistral": (MistralConfig, {}),
    "qwen2": (Qwen2Config, {}),  # q/k/v biases, no output bias
}


def other_model(model_type: str, randomise, **overrides):
    """A tiny randomised model of another HF model type the adapters claim."""
    config_cls, extra = OTHER_TYPES[model_type]
    tok = tiny_tokenizer()
    cfg = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               tie_word_embeddings=False, **extra)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_cls(**cfg), attn_implementation="eager")
    randomise(model)
    return prepare(model, tok, name=f"tiny-{model_type}")


@pytest.fixture(params=list(VARIANTS) + list(OTHER_TYPES))
def variant_lm(request, make_lm, randomise):
    """A randomised tiny model of every variant the adapters claim."""
    if request.param in OTHER_TYPES:
        return other_model(request.param, randomise)
    family, overrides = VARIANTS[request.param]
    return make_lm(family, **overrides)


@pytest.fixture
def padded_batch(variant_lm, qa_samples):
    """Four samples of four different lengths, right-padded."""
    batch = collate(encode_samples(variant_lm.tokenizer, qa_samples[:4]), variant_lm.pad_token_id)
    lengths = batch.attention_mask.sum(1)
    assert len(set(lengths.tolist())) == 4 and (~batch.attention_mask).any()
    return batch


# --- the command line, as the failure tests drive it ---------------------------------------------

def invoke(*args):
    """``cud ARGS`` in-process (typer's runner); arguments are stringified."""
    from typer.testing import CliRunner

    from cud.cli import app
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, *needles: str) -> str:
    """A CudError-style refusal: exit 2, exactly one line ``error: ...`` holding every needle."""
    out = result.output.strip()
    assert "Traceback" not in out, out
    assert result.exit_code == 2, (result.exit_code, out[-3000:], result.exception)
    lines = out.splitlines()
    assert len(lines) == 1, out[-3000:]
    assert lines[0].startswith("error: "), out
    for needle in needles:
        assert needle in lines[0], (needle, out)
    return lines[0]


def save_model(lm, folder):
    """``lm`` (model and tokenizer) saved as a Hugging Face folder; the folder."""
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny llama (seed 0) saved as a model folder the commands load."""
    return save_model(tiny_model("llama", seed=0), tmp_path_factory.mktemp("model"))
