"""On a tiny model taught a few facts, every method raises the forget set's NLL; GradDiff keeps
the retain set's; runs are reproducible; the loop honours its settings."""

import copy

import pytest
import torch

from cud.data import encode_samples, load_qa
from cud.errors import ConfigError
from cud.models.tiny import tiny_model
from cud.data.prepare import split_forget_retain
from cud.unlearning import METHODS, TrainConfig, unlearn
from cud.unlearning.finetune import teach
from cud.unlearning.loop import lr_factor, train
from cud.unlearning.methods.rmu import mlp_modules

STEPS = TrainConfig(lr=3e-3, max_steps=10, batch_size=4, warmup=0, weight_decay=0.0)
QUICK_METRICS = ("nll", "prob", "exact_mem")


@pytest.fixture(scope="module")
def taught():
    """A tiny llama that has memorised 16 built-in facts (byte-level answers)."""
    lm = tiny_model("llama", seed=0)
    samples = load_qa("builtin:16")
    teach(lm.model, encode_samples(lm.tokenizer, samples),
          TrainConfig(lr=1e-2, epochs=60, batch_size=8, weight_decay=0.0, warmup=0.05),
          pad_token_id=lm.pad_token_id)
    forget, retain = split_forget_retain(samples, 0.5)
    return lm, forget, retain


def test_teaching_memorises(taught):
    from cud.models.answers import teacher_forced_outcomes
    lm, forget, retain = taught
    df = teacher_forced_outcomes(lm, forget + retain)
    assert df["exact_mem"].mean() > 0.95


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_raises_forget_nll(taught, method):
    lm, forget, retain = taught
    original = copy.deepcopy(lm.model.state_dict())
    hyper = {"coefficient": 5.0} if method == "rmu" else None
    result = unlearn(lm, forget, retain, method=method, train_config=STEPS,
                     hyperparameters=hyper, metrics=QUICK_METRICS)
    assert result.deltas["nll_delta"].mean() > 0.1, result.deltas
    assert set(result.deltas.index) == {s.id for s in forget}
    # the caller's model is untouched
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, original[k])


def test_graddiff_keeps_retain_nll(taught):
    lm, forget, retain = taught
    result = unlearn(lm, forget, retain, method="graddiff", train_config=STEPS,
                     metrics=QUICK_METRICS, evaluate_retain=True)
    forget_rise = result.deltas["nll_delta"].mean()
    retain_rise = (result.retain_after["nll"] - result.retain_before["nll"]).mean()
    # tolerance: retain NLL rises by less than 0.6 nats while forget NLL rises by more than 2,
    # and by much less than GA without a retain term on the same steps
    assert forget_rise > 2.0
    assert retain_rise < 0.6
    ga = unlearn(lm, forget, retain, method="ga", train_config=STEPS, metrics=QUICK_METRICS,
                 evaluate_retain=True)
    assert retain_rise < 0.2 * (ga.retain_after["nll"] - ga.retain_before["nll"]).mean()


def test_same_seed_same_outcomes(taught):
    lm, forget, retain = taught
    runs = [unlearn(lm, forget, retain, method="npo", train_config=STEPS, metrics=QUICK_METRICS)
            for _ in range(2)]
    torch.testing.assert_close(torch.tensor(runs[0].deltas.to_numpy()),
                               torch.tensor(runs[1].deltas.to_numpy()), rtol=0, atol=0)
    other = unlearn(lm, forget, retain, method="npo", metrics=QUICK_METRICS,
                    train_config=TrainConfig(**{**STEPS.to_dict(), "seed": 1}))
    assert not runs[0].deltas.equals(other.deltas)


def test_rmu_moves_only_mlps_up_to_its_layer(taught):
    lm, forget, retain = taught
    result = unlearn(lm, forget, retain, method="rmu", train_config=STEPS,
                     hyperparameters={"layer": 0, "coefficient": 5.0, "update_layers": 1},
                     metrics=("nll",))
    before, after = lm.model.state_dict(), result.model.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.layers.0.mlp.") for k in changed)
    assert set(mlp_modules(lm.model)) == {0, 1}


def test_trajectory_and_steps_to_forget(taught):
    lm, forget, retain = taught
    result = unlearn(lm, forget, retain, method="graddiff", train_config=STEPS, eval_every=2,
                     metrics=("nll", "prob"))
    assert sorted(result.trajectory["step"].unique()) == [0, 2, 4, 6, 8, 10]
    assert len(result.trajectory) == 6 * len(forget)
    stf = result.steps_to_forget
    assert set(stf.index) == {s.id for s in forget}
    assert stf.dropna().between(2, 10).all()
    # the end of the trajectory is the outcome after unlearning
    last = result.trajectory[result.trajectory["step"] == 10].set_index("id")["nll"]
    torch.testing.assert_close(torch.tensor(last.loc[result.after.index].to_numpy()),
                               torch.tensor(result.after["nll"].to_numpy()), rtol=1e-5, atol=1e-5)
    per_sample = result.per_sample()
    assert "steps_to_forget" in per_sample and "nll_delta" in per_sample


def test_gradient_accumulation_counts_optimizer_steps():
    lm = tiny_model("gpt2")
    enc = encode_samples(lm.tokenizer, load_qa("builtin:10"))
    seen = []
    cfg = TrainConfig(lr=1e-3, epochs=2, batch_size=2, grad_accum=5, warmup=0)
    log = train(lm.model, lambda m, f, r: (m(input_ids=f.input_ids).logits.mean(), {}), enc, None,
                cfg, pad_token_id=lm.pad_token_id, progress=lambda task, s, t, info: seen.append(s))
    assert log.total_steps == 2 and seen == [1, 2]
    assert all(p.requires_grad for p in lm.model.parameters())
    assert not lm.model.training


def test_lr_schedule():
    assert lr_factor(0, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(1, 10, 2, "linear") == pytest.approx(1.0)
    assert lr_factor(2, 10, 2, "linear") == pytest.approx(1.0)
    assert lr_factor(9, 10, 2, "linear") == pytest.approx(1 / 8)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "constant") == 1.0


def test_bad_settings_are_config_errors(taught):
    lm, forget, retain = taught
    with pytest.raises(ConfigError):
        unlearn(lm, forget, retain, method="ga", train_config=TrainConfig(lr=-1.0))
    with pytest.raises(ConfigError, match="retain"):
        unlearn(lm, forget, None, method="graddiff", train_config=STEPS, metrics=("nll",))
    with pytest.raises(ConfigError, match="hyperparameter table"):
        unlearn(lm, forget, retain, method="ga", hyperparameter_table="nope")


def test_bf16_unlearning_computes_with_the_moving_weights(taught, tmp_path):
    """bf16 matrix products (``UnlearningSettings.bf16``) train and evaluate the weights as
    they move: with autocast's weight cache, the block held around training fed every step,
    and the evaluation after it, the bf16 copies of the weights as they were at the start, so
    GradDiff on TOFU moved the forget NLL by 0.002 instead of 3.5."""
    import pandas as pd
    from cud.unlearning.folder import UnlearningSettings, unlearn_to_folder
    lm, forget, retain = taught
    rises = {}
    for bf16 in (False, True):
        settings = UnlearningSettings(methods=("ga",), lr=STEPS.lr, max_steps=STEPS.max_steps,
                                      batch_size=STEPS.batch_size, bf16=bf16, utility=False)
        out = tmp_path / f"bf16-{bf16}"
        unlearn_to_folder(lm, forget, retain, out, settings)
        rises[bf16] = pd.read_parquet(out / "ga" / "outcomes.parquet")["nll_delta"].mean()
    assert rises[False] > 0.5
    assert rises[True] > 0.5 * rises[False], rises


def test_the_retain_evaluation_before_unlearning_is_shared_by_every_method(taught, tmp_path,
                                                                           monkeypatch):
    """The unlearning stage measures the original model on the retain set once (kept as
    ``retain_before``), not once per method, and each method's retain NLL change equals the one
    ``unlearn`` computes on its own."""
    import json

    import pandas as pd

    from cud.unlearning import folder
    from cud.unlearning.folder import UnlearningSettings, unlearn_to_folder
    lm, forget, retain = taught
    calls = []
    real = folder.retain_outcomes
    monkeypatch.setattr(folder, "retain_outcomes",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    settings = UnlearningSettings(methods=("ga", "graddiff"), lr=STEPS.lr, max_steps=3,
                                  batch_size=STEPS.batch_size, utility=False)
    unlearn_to_folder(lm, forget, retain, tmp_path, settings)
    assert len(calls) == 1
    shared = pd.read_parquet(tmp_path / "retain_before.parquet")
    alone = unlearn(lm, forget, retain, method="graddiff",
                    train_config=settings.train_config("graddiff"),
                    hyperparameters=settings.method_hyperparameters("graddiff"),
                    evaluate_retain=True, metrics=QUICK_METRICS, batch_size=16)
    pd.testing.assert_frame_equal(shared, alone.retain_before, check_like=True)
    stored = json.loads((tmp_path / "graddiff" / "settings.json").read_text())
    mean_delta = float((alone.retain_after["nll"] - alone.retain_before["nll"]).mean())
    assert stored["retain_nll_delta_mean"] == pytest.approx(mean_delta, abs=1e-6)
    # a third method added later reads the kept evaluation back
    more = UnlearningSettings(methods=("ga", "graddiff", "npo"), lr=STEPS.lr, max_steps=3,
                              batch_size=STEPS.batch_size, utility=False)
    unlearn_to_folder(lm, forget, retain, tmp_path, more)
    assert len(calls) == 1
