"""Tiny random-weight models and an in-process byte-level tokenizer, for tests and examples.

Nothing here touches the disk or the network: a model is built from a config in milliseconds.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GemmaConfig,
                          GPT2Config, GPTNeoXConfig, LlamaConfig, Olmo2Config, Phi3Config,
                          PhiConfig, PreTrainedTokenizerFast, Qwen3Config)

from cud.models.loading import LoadedModel, prepare

FAMILIES = ("llama", "gpt2", "gpt_neox", "phi", "phi3", "qwen3", "gemma", "olmo2", "gemma2",
            "gemma3_text")
_SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>"]
_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte, 256 + 5 special tokens), built in memory."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|pad|>",
                                  bos_token="<|bos|>", eos_token="<|eos|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    if chat_template:
        tok.chat_template = _CHAT_TEMPLATE
    return tok


def tiny_config(family: str, vocab_size: int, **overrides):
    """A small config of ``family`` (2 layers, 4 heads, d=32 unless overridden)."""
    if family == "llama":
        cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-5)
        cfg.update(overrides)
        return LlamaConfig(**cfg)
    if family == "gpt2":
        cfg = dict(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                   bos_token_id=1, eos_token_id=2)
        cfg.update(overrides)
        return GPT2Config(**cfg)
    if family == "gpt_neox":
        cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                   rotary_pct=0.5, use_parallel_residual=True, tie_word_embeddings=False,
                   hidden_dropout=0.0, attention_dropout=0.0)
        cfg.update(overrides)
        return GPTNeoXConfig(**cfg)
    if family == "phi":  # Phi-1.5 / Phi-2: parallel block, LayerNorm, partial rotary
        cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                   partial_rotary_factor=0.5, tie_word_embeddings=False, resid_pdrop=0.0,
                   embd_pdrop=0.0, attention_dropout=0.0, bos_token_id=1, eos_token_id=2)
        cfg.update(overrides)
        return PhiConfig(**cfg)
    if family == "phi3":  # fused qkv_proj and gate_up_proj; multi-head as Phi-3-mini
        cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                   max_position_embeddings=256, original_max_position_embeddings=256,
                   tie_word_embeddings=False, rms_norm_eps=1e-5, resid_pdrop=0.0,
                   embd_pdrop=0.0, attention_dropout=0.0, pad_token_id=0, bos_token_id=1,
                   eos_token_id=2)
        cfg.update(overrides)
        return Phi3Config(**cfg)
    if family == "qwen3":  # q_norm / k_norm; head_dim is its own setting
        cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-6)
        cfg.update(overrides)
        return Qwen3Config(**cfg)
    if family == "gemma":  # Gemma-2B style: multi-query, head_dim decoupled (4 x 16 != 32)
        cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                   head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
                   # released Gemmas use 1e-6; with it a tiny model's layer-0 norm is exactly
                   # scale-invariant along the zero ablation's path (sqrt(d)-scaled embeddings),
                   # and the by-layer zero schedule's input edges get no gradient (see README)
                   rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        cfg.update(overrides)
        return GemmaConfig(**cfg)
    if family == "olmo2":  # post-norm, q_norm / k_norm over the whole projections
        cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-6,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
        cfg.update(overrides)
        return Olmo2Config(**cfg)
    if family == "gemma2":  # post-norm Gemma, soft caps, query_pre_attn_scalar != head_dim
        # soft caps smaller than the released 50 / 30, so that they change a tiny model's logits;
        # layer 0 is a sliding-window layer, its window (256) longer than any test batch unless
        # overridden (as for the other families, the window is a variant)
        cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, query_pre_attn_scalar=24, max_position_embeddings=256,
                   sliding_window=256, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                   tie_word_embeddings=True, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1,
                   eos_token_id=2)
        cfg.update(overrides)
        return Gemma2Config(**cfg)
    if family == "gemma3_text":  # Gemma 2's block, per-head q/k norms, local/global rotary bases
        # layer 0 local (sliding, base 10^4; its window longer than any test batch unless
        # overridden), layer 1 global (base 10^6)
        cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, query_pre_attn_scalar=24, max_position_embeddings=256,
                   sliding_window=256, layer_types=["sliding_attention", "full_attention"],
                   tie_word_embeddings=True, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1,
                   eos_token_id=2)
        cfg.update(overrides)
        cfg["layer_types"] = list(cfg["layer_types"])  # a tuple in a hashable override
        return Gemma3TextConfig(**cfg)
    raise ValueError(f"unknown family '{family}' (choose from {', '.join(FAMILIES)})")


def tiny_model(family: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32,
               chat_template: bool = True, **overrides) -> LoadedModel:
    """A random-weight model of ``family`` with the tiny tokenizer, ready for cud."""
    tokenizer = tiny_tokenizer(chat_template=chat_template)
    config = tiny_config(family, vocab_size=len(tokenizer), **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    if family in ("qwen3", "olmo2"):
        # q_norm / k_norm initialised to 1 make a tiny model's attention saturated from the
        # start (unit-size q and k); 0.2 keeps it soft, where single-edge effects are
        # near-linear (the attribution tests compare EAP-IG with brute-force patching there;
        # OLMo 2 with unit q/k norms: Spearman 0.62-0.79, with 0.2: 0.87-0.93)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.mul_(0.2)
                layer.self_attn.k_norm.weight.mul_(0.2)
    if family in ("gemma2", "gemma3_text"):
        # post-norm gains initialised to (1 + 0) = 1 make every sublayer write a unit-size
        # output, ten times the scaled embedding (0.11): each layer overwrites the stream, and
        # greedy circuits of the zero baseline's scores are erratic (Gemma 2: faithfulness
        # Spearman over n 0.76). Gains of 0.1 keep the writes at the embedding's scale, small
        # against the stream as in trained models (Gemma 2: 0.88)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.post_attention_layernorm.weight.fill_(-0.9)
                layer.post_feedforward_layernorm.weight.fill_(-0.9)
                if family == "gemma3_text":  # (1 + w) = 0.2, as Qwen3's q/k norm gains above
                    layer.self_attn.q_norm.weight.fill_(-0.8)
                    layer.self_attn.k_norm.weight.fill_(-0.8)
    model.to(dtype)
    return prepare(model, tokenizer, name=f"tiny-{family}")
