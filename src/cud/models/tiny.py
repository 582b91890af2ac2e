"""Tiny random-weight models and an in-process byte-level tokenizer, for tests and examples.

Nothing here touches the disk or the network: a model is built from a config in milliseconds.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig,
                          PreTrainedTokenizerFast)

from cud.models.loading import LoadedModel, prepare

FAMILIES = ("llama", "gpt2", "gpt_neox")
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
    raise ValueError(f"unknown family '{family}' (choose from {', '.join(FAMILIES)})")


def tiny_model(family: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32,
               chat_template: bool = True, **overrides) -> LoadedModel:
    """A random-weight model of ``family`` with the tiny tokenizer, ready for cud."""
    tokenizer = tiny_tokenizer(chat_template=chat_template)
    config = tiny_config(family, vocab_size=len(tokenizer), **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.to(dtype)
    return prepare(model, tokenizer, name=f"tiny-{family}")
