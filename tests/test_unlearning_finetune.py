"""Fine-tuning: it teaches, a cached folder is reused, a changed setting or data is not."""

from dataclasses import replace

import pytest

from cud.data import load_qa
from cud.models.tiny import tiny_model
from cud.unlearning.finetune import FinetuneSettings, cache_key, finetune

SMALL = FinetuneSettings(lr=1e-2, epochs=20, batch_size=4, warmup=0.05, weight_decay=0.0)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny llama saved as a Hugging Face folder, so it loads by path like a real model."""
    path = tmp_path_factory.mktemp("tiny-llama")
    lm = tiny_model("llama", seed=0)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return str(path)


def test_finetune_teaches_and_reuses_its_cache(tiny_folder, tmp_path):
    samples = load_qa("builtin:8")
    config = replace(SMALL, cache_dir=str(tmp_path))
    first = finetune(tiny_folder, samples, config)
    assert not first.reused
    assert first.report["after"]["exact_mem"] > first.report["before"]["exact_mem"]
    assert first.report["after"]["nll"] < first.report["before"]["nll"]
    assert (first.path / "config.json").is_file()
    assert list(first.memorisation.index) == [s.id for s in samples]

    again = finetune(tiny_folder, samples, config)
    assert again.reused and again.path == first.path
    assert again.report == first.report
    # the reloaded folder is the trained model
    import torch
    for (k, v), (_, w) in zip(first.model.model.state_dict().items(),
                              again.model.model.state_dict().items()):
        torch.testing.assert_close(v, w)

    changed = finetune(tiny_folder, samples, replace(config, lr=5e-3), keep_model=False)
    assert not changed.reused and changed.path != first.path
    assert changed.model is None


def test_cache_key_depends_on_model_data_and_settings(tiny_folder):
    samples = load_qa("builtin:8")
    base = cache_key(tiny_folder, samples, SMALL)
    assert base == cache_key(tiny_folder, samples, SMALL)
    assert base != cache_key(tiny_folder, samples[:7], SMALL)
    assert base != cache_key(tiny_folder, load_qa("builtin:8:1"), SMALL)
    assert base != cache_key(tiny_folder, samples, replace(SMALL, seed=1))
    assert base != cache_key(tiny_folder, samples, replace(SMALL, lora=True))
    assert base != cache_key("smollm2", samples, SMALL)
    # where the folder is cached, and whether cud run fine-tunes, do not change the weights
    assert base == cache_key(tiny_folder, samples, replace(SMALL, cache_dir="/elsewhere",
                                                           enabled=False))


def test_lora_finetune_saves_a_plain_model(tiny_folder, tmp_path):
    samples = load_qa("builtin:8")
    result = finetune(tiny_folder, samples, replace(SMALL, lr=3e-2, lora=True, lora_r=8,
                                                    cache_dir=str(tmp_path)))
    assert result.report["after"]["nll"] < result.report["before"]["nll"]
    assert not (result.path / "adapter_config.json").exists()  # merged, not an adapter
    assert not any("lora" in k for k in result.model.model.state_dict())


def test_end_token_is_taught_after_the_answer():
    from cud.data import encode_sample
    from cud.models.tiny import tiny_tokenizer
    from cud.unlearning.finetune import with_end_token
    tok = tiny_tokenizer()
    e = encode_sample(tok, load_qa("builtin:1")[0])
    ended = with_end_token(e, tok.eos_token_id)
    assert ended.input_ids[-1] == tok.eos_token_id and ended.answer_mask[-1]
    assert sum(ended.answer_mask) == sum(e.answer_mask) + 1
    assert cache_key("x", load_qa("builtin:2"), FinetuneSettings()) != \
        cache_key("x", load_qa("builtin:2"), FinetuneSettings(teach_end=False))


def test_bf16_matches_fp32_within_its_resolution(tiny_folder, tmp_path):
    """bf16 matrix products (fp32 master weights and losses): the answer metrics of the same
    model agree with fp32 to bf16's resolution, and fine-tuning in bf16 teaches as fp32 does."""
    import torch

    from cud.models.answers import teacher_forced_outcomes
    from cud.models.loading import load_model
    from cud.models.precision import matmul_precision

    samples = load_qa("builtin:8")
    lm = load_model(tiny_folder)
    fp32 = teacher_forced_outcomes(lm, samples)
    with matmul_precision(lm.device, True):
        bf16 = teacher_forced_outcomes(lm, samples)
    # 8 mantissa bits: each logit to about 0.4 %, a mean answer NLL to well under 2 %
    relative = ((bf16["nll"] - fp32["nll"]).abs() / fp32["nll"]).max()
    assert 0 < relative < 0.02, relative                 # > 0: the bf16 path was in effect
    assert next(lm.model.parameters()).dtype == torch.float32

    taught = {bf16: finetune(tiny_folder, samples,
                             replace(SMALL, cache_dir=str(tmp_path), bf16=bf16),
                             keep_model=False).report["after"]
              for bf16 in (False, True)}
    before = float(fp32["nll"].mean())
    assert taught[False]["nll"] < 0.5 * before and taught[True]["nll"] < 0.5 * before, taught
    # the same schedule lands in the same place, to within a quarter of what is left to learn
    assert abs(taught[True]["nll"] - taught[False]["nll"]) <= 0.25 * taught[False]["nll"], taught
