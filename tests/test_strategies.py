"""Strategies wrap the methods in the training loop: reweight scales each sample's gradient by
exactly its weight, curriculum visits the difficulty tertiles in order within the same steps,
focus stops training on forgotten samples, localize moves only the chosen components' entries,
plain is the loop as before; folders refuse mixing strategies; the CLI's errors are one line."""

import copy

import pytest
import torch

from cud.circuits.graph import Graph
from cud.data import encode_samples, load_qa
from cud.data.encoding import collate
from cud.errors import ConfigError
from cud.models.answers import answer_nll
from cud.models.tiny import tiny_model
from cud.unlearning import TrainConfig, make_method
from cud.unlearning.localize import component_scores, parameter_masks, top_components
from cud.unlearning.loop import TrainPlan, answer_probabilities, stage_bounds, train
from cud.unlearning.strategies import plan, reweight, tertiles


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def samples():
    return load_qa("builtin:9")


def _grads(model):
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
            for p in model.parameters()]


def _spy(record):
    """An objective recording each forget micro-batch's ids (GA's loss)."""
    def objective(model, forget, retain):
        record.append(list(forget.ids))
        return -answer_nll(model, forget).mean(), {}
    return objective


# reweight -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ga", "npo", "simnpo", "undial"])
def test_reweight_scales_each_sample_gradient_exactly(lm, samples, method):
    """The weighted loss's gradient on a batch equals (1/B) sum_i w_i g_i, g_i the plain
    loss's gradient on sample i alone (hand-weighted)."""
    model = copy.deepcopy(lm.model)
    reference = copy.deepcopy(lm.model) if method in ("npo", "undial") else None
    m = make_method(method, **({"alpha": 0.0} if method != "ga" else {}))
    m.setup(model, reference)
    enc = encode_samples(lm.tokenizer, samples[:4])
    weights = torch.tensor([0.5, 2.0, 1.0, 3.5])
    batch = collate(enc, lm.pad_token_id)
    batch.weights = weights
    model.zero_grad()
    m.loss(model, batch, None)[0].backward()
    weighted = _grads(model)
    expected = [torch.zeros_like(g) for g in weighted]
    for i, e in enumerate(enc):
        model.zero_grad()
        m.loss(model, collate([e], lm.pad_token_id), None)[0].backward()
        for acc, g in zip(expected, _grads(model)):
            acc += weights[i] * g / len(enc)
    for got, want in zip(weighted, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_reweight_in_the_loop_weights_each_sample(lm, samples):
    """Through the loop: weight B on one sample and 0 on the others gives the step of training
    on that sample alone."""
    enc = encode_samples(lm.tokenizer, samples[:4])
    config = TrainConfig(lr=1e-2, max_steps=1, batch_size=4, warmup=0, max_grad_norm=None)
    weighted = copy.deepcopy(lm.model)
    w = {e.id: 0.0 for e in enc} | {enc[2].id: 4.0}
    train(weighted, make_method("ga").loss, enc, None, config, pad_token_id=lm.pad_token_id,
          plan=TrainPlan(weights=w))
    alone = copy.deepcopy(lm.model)
    train(alone, make_method("ga").loss, [enc[2]], None, config, pad_token_id=lm.pad_token_id)
    for a, b in zip(weighted.parameters(), alone.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(weighted.parameters(),
                                                     lm.model.parameters()))


def test_reweight_formula():
    w = reweight({"a": 0.0, "b": 1.0, "c": 2.0, "d": 3.0}, 0.25, 4.0)
    assert w["a"] < w["b"] < w["c"] < w["d"]
    assert sum(w.values()) / 4 == pytest.approx(1.0)
    assert reweight({"a": 5.0, "b": 5.0}, 0.25, 4.0) == {"a": 1.0, "b": 1.0}
    clipped = reweight({str(i): float(i == 0) * 100 for i in range(50)}, 0.25, 4.0)
    assert max(clipped.values()) == 4.0 and min(clipped.values()) >= 0.25


# curriculum ---------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["easy-to-hard", "hard-to-easy"])
def test_curriculum_visits_tertiles_in_order_with_the_same_steps(lm, samples, order):
    enc = encode_samples(lm.tokenizer, samples)
    difficulty = {e.id: float(k) for k, e in enumerate(enc)}   # ids in difficulty order
    groups = tertiles(difficulty, order)
    easy, hard = [e.id for e in enc[:3]], [e.id for e in enc[6:]]
    assert groups[0] == (easy if order == "easy-to-hard" else hard)
    config = TrainConfig(lr=1e-3, max_steps=9, batch_size=2, warmup=0)
    record, plain_record = [], []
    log = train(copy.deepcopy(lm.model), _spy(record), enc, None, config,
                pad_token_id=lm.pad_token_id, plan=TrainPlan(stages=groups))
    plain = train(copy.deepcopy(lm.model), _spy(plain_record), enc, None, config,
                  pad_token_id=lm.pad_token_id)
    assert len(record) == len(plain_record) == log.stopped_at == plain.stopped_at == 9
    stage_of = {i: g for g, group in enumerate(groups) for i in group}
    visited = [max(stage_of[i] for i in ids) for ids in record]
    assert visited == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(len({stage_of[i] for i in ids}) == 1 for ids in record)
    assert [row["stage"] for row in log.steps] == visited
    assert stage_bounds(10, [3, 3, 3]) == [3, 7, 10]


# focus --------------------------------------------------------------------------------------
def test_focus_stops_training_on_forgotten_samples(lm, samples):
    enc = encode_samples(lm.tokenizer, samples[:6])
    probs = answer_probabilities(lm.model, enc, lm.pad_token_id)
    ranked = sorted(probs, key=probs.get)
    threshold = (probs[ranked[2]] + probs[ranked[3]]) / 2   # the three least likely: forgotten
    forgotten = set(ranked[:3])
    record = []
    config = TrainConfig(lr=1e-12, max_steps=6, batch_size=3, warmup=0)   # barely moves
    log = train(copy.deepcopy(lm.model), _spy(record), enc, None, config,
                pad_token_id=lm.pad_token_id,
                plan=TrainPlan(focus_every=2, focus_threshold=threshold))
    assert len(record) == 6
    assert not forgotten & {i for ids in record for i in ids}
    assert {i for ids in record for i in ids} == set(ranked[3:])
    assert [row["focus_active"] for row in log.steps] == [3] * 6


def test_focus_stops_when_everything_is_forgotten(lm, samples):
    enc = encode_samples(lm.tokenizer, samples[:4])
    record = []
    log = train(copy.deepcopy(lm.model), _spy(record), enc, None,
                TrainConfig(lr=1e-3, max_steps=5, batch_size=2, warmup=0),
                pad_token_id=lm.pad_token_id, plan=TrainPlan(focus_every=1, focus_threshold=2.0))
    assert record == [] and log.stopped_at == 0


# localize -----------------------------------------------------------------------------------
def test_component_scores_sum_edges_a_component_touches():
    graph = Graph(n_layers=2, n_heads=2)
    scores = torch.zeros(2, graph.n_edges)
    lookup = graph.edge_lookup
    scores[0, lookup["a0.h1->m1"]] = -3.0          # a0.h1 writes, m1 reads
    scores[1, lookup["input->a1.h0<q>"]] = 2.0      # a1.h0 reads
    scores[1, lookup["m0->logits"]] = 0.5
    circuits = scores != 0
    got = component_scores(graph, scores, circuits)
    assert got["a0.h1"] == 3.0 and got["m1"] == 3.0 and got["a1.h0"] == 2.0
    assert got["m0"] == 0.5 and got["a0.h0"] == 0.0
    assert top_components(got, 2) == ["a0.h1", "m1"]
    outside = component_scores(graph, scores, torch.zeros_like(circuits))
    assert max(outside.values()) == 0.0


def test_localize_freezes_everything_but_the_chosen_components(lm, samples):
    model = copy.deepcopy(lm.model)
    masks = parameter_masks(lm.adapter, ["a0.h1", "m1"])
    e = lm.adapter.head_dim
    attn = "model.layers.0.self_attn."
    q = masks[attn + "q_proj.weight"]
    assert q[e:2 * e].all() and q.sum() == e * q.shape[1]
    o = masks[attn + "o_proj.weight"]
    assert o[:, e:2 * e].all() and o.sum() == e * o.shape[0]
    assert masks[attn + "k_proj.weight"][:e].all()          # kv head 0 serves query heads 0, 1
    assert all(masks[n].all() for n in masks if n.startswith("model.layers.1.mlp."))
    assert not any(n.startswith("model.layers.1.self_attn") for n in masks)
    before = copy.deepcopy(model.state_dict())
    enc = encode_samples(lm.tokenizer, samples[:4])
    train(model, make_method("ga").loss, enc, None,
          TrainConfig(lr=1e-2, max_steps=3, batch_size=2, warmup=0, weight_decay=0.5),
          pad_token_id=lm.pad_token_id, plan=TrainPlan(masks=masks))
    for name, p in model.named_parameters():
        mask = masks.get(name, torch.zeros_like(p, dtype=torch.bool))
        assert torch.equal(p[~mask], before[name][~mask]), name
        if mask.any():
            assert not torch.equal(p[mask], before[name][mask]), name


# plain --------------------------------------------------------------------------------------
def test_plain_is_the_loop_without_a_plan(lm, samples):
    enc = encode_samples(lm.tokenizer, samples[:6])
    config = TrainConfig(lr=1e-2, max_steps=4, batch_size=2, warmup=1)
    a, b = copy.deepcopy(lm.model), copy.deepcopy(lm.model)
    train(a, make_method("ga").loss, enc, None, config, pad_token_id=lm.pad_token_id)
    assert plan("plain", threshold=0.1, reweight_min=0.25, reweight_max=4.0,
                order="easy-to-hard", focus_every=5) is None
    train(b, make_method("ga").loss, enc, None, config, pad_token_id=lm.pad_token_id,
          plan=TrainPlan())
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


def test_plans_refuse_bad_input(lm, samples):
    enc = encode_samples(lm.tokenizer, samples[:3])
    config = TrainConfig(lr=1e-3, max_steps=1, batch_size=2, warmup=0)
    with pytest.raises(ConfigError, match="miss 1 forget"):
        train(copy.deepcopy(lm.model), make_method("ga").loss, enc, None, config,
              pad_token_id=lm.pad_token_id,
              plan=TrainPlan(weights={e.id: 1.0 for e in enc[:2]}))
    with pytest.raises(ConfigError, match="one stage"):
        train(copy.deepcopy(lm.model), make_method("ga").loss, enc, None, config,
              pad_token_id=lm.pad_token_id, plan=TrainPlan(stages=[[enc[0].id]]))
    with pytest.raises(ConfigError, match="unknown strategy"):
        plan("bogus", threshold=0.1, reweight_min=0.25, reweight_max=4.0,
             order="easy-to-hard", focus_every=5)


# the folder and the command ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-strategies")
    lm = tiny_model("llama", seed=0)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return str(path)


def _unlearn(folder, out, *extra):
    from typer.testing import CliRunner

    from cud.cli import app
    args = ["unlearn", "--model", folder, "--data", "builtin:8", "--method", "ga",
            "--max-steps", 3, "--batch-size", 2, "--no-utility", "--out", out, *extra]
    return CliRunner().invoke(app, [str(a) for a in args])


def test_folder_records_the_strategy_and_refuses_mixing(tiny_folder, tmp_path):
    import json

    import pandas as pd
    out = tmp_path / "u"
    first = _unlearn(tiny_folder, out, "--strategy", "reweight", "--difficulty", "loss")
    assert first.exit_code == 0, first.output
    manifest = json.loads((out / "unlearning.json").read_text())
    assert manifest["strategy"]["name"] == "reweight"
    assert manifest["strategy"]["difficulty"] == "loss"
    table = pd.read_csv(out / "strategy.csv")
    assert table["weight"].mean() == pytest.approx(1.0)
    before = pd.read_parquet(out / "before.parquet")
    before = before.set_index("id") if "id" in before.columns else before
    hardest = table.set_index("id")["weight"].idxmax()
    assert hardest == before["nll"].idxmin()   # difficulty loss: the best-known answer
    settings = json.loads((out / "ga" / "settings.json").read_text())
    assert settings["request"]["strategy"]["name"] == "reweight"
    stamp = (out / "ga" / "settings.json").stat().st_mtime_ns
    again = _unlearn(tiny_folder, out, "--strategy", "reweight", "--difficulty", "loss")
    assert again.exit_code == 0, again.output    # resumed: the method is read back, not rerun
    assert (out / "ga" / "settings.json").stat().st_mtime_ns == stamp
    for other in (("--strategy", "curriculum", "--difficulty", "loss"), ()):
        mixed = _unlearn(tiny_folder, out, *other)
        assert mixed.exit_code != 0
        assert "strategies do not mix" in mixed.output and "Traceback" not in mixed.output
    plain = tmp_path / "plain"
    assert _unlearn(tiny_folder, plain).exit_code == 0
    assert "strategy" not in json.loads((plain / "unlearning.json").read_text())
    refused = _unlearn(tiny_folder, plain, "--strategy", "focus")
    assert refused.exit_code != 0 and "strategy plain" in refused.output


def test_plain_request_is_unchanged():
    """A plain run's request has no strategy key: folders written before strategies resume."""
    from cud.unlearning.folder import UnlearningSettings
    assert "strategy" not in UnlearningSettings().request("graddiff")
    assert "strategy" in UnlearningSettings(strategy="focus").request("graddiff")


@pytest.mark.parametrize("extra, message", [
    (("--strategy", "bogus"), "unknown strategy 'bogus'"),
    (("--strategy", "reweight"), "needs unlearning.difficulty"),
    (("--strategy", "plain", "--difficulty", "loss"), "read only by the strategies"),
    (("--strategy", "curriculum", "--difficulty", "nope.csv:cud"), "no such file"),
    (("--strategy", "curriculum", "--difficulty", "loss", "--curriculum-order", "up"),
     "curriculum_order"),
    (("--strategy", "localize"), "needs unlearning.circuits"),
])
def test_cli_errors_are_one_line(tiny_folder, tmp_path, extra, message):
    result = _unlearn(tiny_folder, tmp_path / "x", *extra)
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_difficulty_table_missing_forget_samples_is_refused(tiny_folder, tmp_path):
    import pandas as pd

    from cud.data import load_qa
    ids = [s.id for s in load_qa("builtin:8")]
    path = tmp_path / "scores.csv"
    pd.DataFrame({"id": ids[:2], "cud": [0.1, 0.9]}).to_csv(path, index=False)
    result = _unlearn(tiny_folder, tmp_path / "y", "--strategy", "curriculum", "--difficulty",
                      f"{path}:cud")
    assert result.exit_code != 0
    assert "forget samples have no value" in result.output
    assert len(result.output.strip().splitlines()) == 1
    bad_column = _unlearn(tiny_folder, tmp_path / "y", "--strategy", "curriculum",
                          "--difficulty", f"{path}:nope")
    assert "no column 'nope'" in bad_column.output


def test_localize_through_the_folder_moves_only_the_top_components(tiny_folder, tmp_path):
    import json

    from safetensors.torch import load_file

    from cud.circuits.store import CircuitStore
    from cud.data import load_qa
    samples = load_qa("builtin:8")
    graph = Graph(n_layers=2, n_heads=4)
    scores = torch.zeros(len(samples), graph.n_edges)
    scores[:, graph.edge_lookup["a0.h1->m1"]] = 1.0     # a0.h1 and m1 top every circuit
    scores[:, graph.edge_lookup["input->a1.h2<v>"]] = 0.1
    store = CircuitStore.open(tmp_path / "circuits", {"test": 1}, graph)
    store.write_batch([s.id for s in samples], scores, scores != 0,
                      [{"text_hash": str(k)} for k in range(len(samples))])
    out = tmp_path / "u"
    result = _unlearn(tiny_folder, out, "--strategy", "localize", "--circuits",
                      tmp_path / "circuits", "--localize-k", 2, "--save-model")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "unlearning.json").read_text())
    assert manifest["strategy"]["components"] == ["a0.h1", "m1"]
    original = tiny_model("llama", seed=0)
    masks = parameter_masks(original.adapter, ["a0.h1", "m1"])
    after = {}
    for path in (out / "ga" / "model").glob("*.safetensors"):
        after.update(load_file(path))
    moved = set()
    for name, p in original.model.named_parameters():
        if name not in after:   # tied weights saved once
            continue
        mask = masks.get(name, torch.zeros_like(p, dtype=torch.bool))
        assert torch.equal(after[name][~mask], p.detach()[~mask]), name
        if not torch.equal(after[name][mask], p.detach()[mask]):
            moved.add(name)
    assert "model.layers.0.self_attn.q_proj.weight" in moved
    assert any(n.startswith("model.layers.1.mlp.") for n in moved)


# the comparison with plain and its report section -------------------------------------------
def _fake_method(root, method, prob, nll_delta, rise):
    import json

    import pandas as pd
    folder = root / method
    folder.mkdir(parents=True)
    ids = [f"s{k}" for k in range(len(prob))]
    pd.DataFrame({"id": ids, "prob": prob}).to_parquet(folder / "after.parquet")
    pd.DataFrame({"id": ids, "nll_delta": nll_delta}).to_parquet(folder / "outcomes.parquet")
    (folder / "settings.json").write_text(json.dumps({"retain_nll_delta_mean": rise,
                                                      "utility": {"model_utility": rise * 2}}))


def test_comparison_with_plain(tmp_path):
    import numpy as np
    import pandas as pd
    from scipy import stats

    from cud.unlearning.compare import compare_strategy
    n = 20
    difficulty = pd.Series(np.arange(n, dtype=float), index=[f"s{k}" for k in range(n)])
    hard = difficulty >= difficulty.quantile(0.75)          # s15 .. s19
    plain_prob = np.where(hard, 0.9, 0.05)                   # plain forgets only the easy ones
    strategy_prob = np.full(n, 0.05)                         # the strategy forgets everything
    _fake_method(tmp_path / "plain", "ga", plain_prob, np.linspace(0, 1, n), 0.2)
    _fake_method(tmp_path / "s", "ga", strategy_prob, np.linspace(0, 1, n) + 0.5, 0.3)
    row = compare_strategy(tmp_path / "plain", tmp_path / "s", ["ga"], difficulty, 0.1,
                           "reweight").iloc[0]
    assert row["n_hard"] == 5
    assert row["forgotten_plain"] == 0.75 and row["forgotten_strategy"] == 1.0
    assert row["forgotten_hard_plain"] == 0.0 and row["forgotten_hard_strategy"] == 1.0
    assert row["forgotten_plain_lo"] < 0.75 < row["forgotten_plain_hi"]
    assert row["forgotten_hard_strategy_lo"] < 1.0 == pytest.approx(
        row["forgotten_hard_strategy_hi"])
    assert row["retain_rise_plain"] == 0.2 and row["retain_rise_strategy"] == 0.3
    assert row["utility_plain"] == 0.4 and row["utility_strategy"] == 0.6
    assert row["mcnemar_p"] == pytest.approx(stats.binomtest(5, 5, 0.5).pvalue)
    assert row["wilcoxon_p_nll_delta"] < 0.05


def test_report_draws_the_strategy_table(tmp_path):
    import pandas as pd

    from cud.report.html import ReportInputs, build_report
    table = pd.DataFrame({"method": ["ga"], "strategy": ["focus"], "forgotten_plain": [0.25],
                          "forgotten_strategy": [0.5], "mcnemar_p": [0.03]})
    report = build_report(ReportInputs(strategy=table), tmp_path / "r")
    assert "strategy" in report.sections
    page = report.html.read_text()
    assert "Plain against the focus strategy" in page and "0.03" in page
    assert "strategy" not in build_report(ReportInputs(), tmp_path / "r2").sections


def test_report_draws_the_tradeoff_of_a_full_comparison(tmp_path):
    """A comparison with retain rises and hard-quartile shares gets the trade-off figure (plain
    to strategy per method); a table without them gets the table only."""
    import pandas as pd

    from cud.report.html import ReportInputs, build_report
    table = pd.DataFrame({
        "method": ["ga", "npo"], "strategy": ["reweight"] * 2, "n": [20, 20], "n_hard": [5, 5],
        "forgotten_plain": [0.2, 0.05], "forgotten_strategy": [0.3, 0.1],
        "forgotten_hard_plain": [0.0, 0.0], "forgotten_hard_strategy": [0.2, 0.0],
        "forgotten_plain_lo": [0.08, 0.01], "forgotten_plain_hi": [0.42, 0.24],
        "forgotten_strategy_lo": [0.15, 0.03], "forgotten_strategy_hi": [0.52, 0.3],
        "retain_rise_plain": [0.4, 0.1], "retain_rise_strategy": [0.5, 0.12]})
    report = build_report(ReportInputs(strategy=table), tmp_path / "r")
    assert report.figures["strategy_tradeoff"].stat().st_size > 1000
    assert 'data-figure="strategy_tradeoff"' in report.html.read_text()
    bare = table[["method", "strategy", "forgotten_plain", "forgotten_strategy"]]
    assert "strategy_tradeoff" not in build_report(ReportInputs(strategy=bare),
                                                   tmp_path / "r2").figures


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "phi", "phi3", "qwen3",
                                    "gemma", "olmo2", "gemma2", "gemma3_text"])
def test_head_masks_are_exactly_what_the_adapter_reads_for_the_head(family):
    """For every family: entries outside a head's mask never change the head's q/k/v/o slices
    as the adapter reads them; entries inside do; the MLP block's mask covers what mlp() reads."""
    from cud.models.adapters import adapter_for
    lm = tiny_model(family, seed=0)
    model = lm.model
    layer, head = 1, 1
    masks = parameter_masks(lm.adapter, [f"a{layer}.h{head}"])
    total = sum(p.numel() for p in model.parameters())
    chosen = sum(int(m.sum()) for m in masks.values())
    assert 0 < chosen < total / 10

    def slices(adapter):
        weight, bias = adapter.qkv_weights(layer)
        parts = [weight[:, head], adapter.output_weight(layer)[head]]
        return [t.detach().clone() for t in parts + ([bias[:, head]] if bias is not None else [])]

    original = slices(lm.adapter)
    outside, inside = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for name, p in outside.named_parameters():
            p[~masks.get(name, torch.zeros_like(p, dtype=torch.bool))] += 1.0
        for name, p in inside.named_parameters():
            if name in masks:
                p[masks[name]] += 1.0
    assert all(torch.equal(a, b) for a, b in zip(original, slices(adapter_for(outside))))
    assert all(not torch.equal(a, b) for a, b in zip(original, slices(adapter_for(inside))))
    mlp = parameter_masks(lm.adapter, [f"m{layer}"])
    assert mlp and all(m.all() for m in mlp.values())
    assert not set(mlp) & set(masks)


def test_reweight_weights_each_rmu_position_by_its_sample(lm, samples):
    """RMU's loss is a mean over steered positions: sample i's N_i positions weigh w_i each, so
    the batch gradient is sum_i w_i (N_i / N) g_i, g_i its gradient alone."""
    from cud.models.answers import prediction_mask
    model = copy.deepcopy(lm.model)
    m = make_method("rmu", alpha=0.0, coefficient=5.0, layer=1, update_layers=1)
    m.setup(model, copy.deepcopy(lm.model))
    enc = encode_samples(lm.tokenizer, samples[:3])
    weights = torch.tensor([0.5, 3.0, 1.5])
    batch = collate(enc, lm.pad_token_id)
    batch.weights = weights
    model.zero_grad()
    m.loss(model, batch, None)[0].backward()
    weighted = _grads(model)
    positions = prediction_mask(batch).sum(1).float()
    expected = [torch.zeros_like(g) for g in weighted]
    for i, e in enumerate(enc):
        model.zero_grad()
        m.loss(model, collate([e], lm.pad_token_id), None)[0].backward()
        for acc, g in zip(expected, _grads(model)):
            acc += weights[i] * positions[i] / positions.sum() * g
    for got, want in zip(weighted, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
