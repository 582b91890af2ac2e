"""Item 5 of issue 3 on the real model (slow: run with -m smollm2): the built-in data is learnable
and a default unlearning run spreads the forget set out."""

import pytest

from cud.data import load_qa
from cud.data.prepare import add_perturbed_answers, split_forget_retain
from cud.unlearning import finetune, unlearn

pytestmark = pytest.mark.smollm2


def test_default_finetune_memorises_and_unlearning_spreads(tmp_path):
    samples = add_perturbed_answers(load_qa("builtin"))
    taught = finetune("smollm2", samples, cache_dir=tmp_path)
    assert taught.report["after"]["exact_mem"] >= 0.9
    forget, retain = split_forget_retain(samples, 0.5)
    result = unlearn(taught.model, forget, retain, method="graddiff",
                     metrics=("nll", "prob", "exact_mem"))
    rise = result.deltas["nll_delta"]
    assert rise.quantile(0.75) - rise.quantile(0.25) > 0.3  # a spread, not a uniform shift
    assert (result.after["prob"] < 0.1).any() and (result.after["prob"] > 0.5).any()
