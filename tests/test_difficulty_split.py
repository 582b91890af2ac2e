"""The easy/hard split protocol runs end to end on a tiny model."""

import numpy as np
import pandas as pd
import pytest

from cud.data import load_qa
from cud.difficulty.split import easy_hard_protocol, split_halves
from cud.errors import ConfigError
from cud.models import tiny_model
from cud.data.general import general_knowledge
from cud.unlearning.loop import TrainConfig


def test_halves_are_equal_disjoint_and_ordered():
    scores = pd.Series([0.9, 0.1, 0.5, 0.3, 0.7], index=list("abcde"))
    easy, hard = split_halves(scores)
    assert easy == ["b", "d"] and hard == ["e", "a"]  # the median sample (c) sits out
    with pytest.raises(ConfigError):
        split_halves(pd.Series([0.5], index=["a"]))


def test_protocol_end_to_end_on_a_tiny_model():
    lm = tiny_model("llama", seed=0)
    samples = load_qa("builtin:20")
    forget, retain = samples[:10], samples[10:]
    scores = pd.Series(np.linspace(0, 1, 10), index=[s.id for s in forget])
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    result = easy_hard_protocol(lm, forget, scores, retain=retain,
                                general=general_knowledge()[:6], method="graddiff",
                                train_config=TrainConfig(lr=1e-3, max_steps=2, batch_size=4))
    assert set(result.forget["half"]) == {"easy", "hard"}
    easy = result.forget[result.forget["half"] == "easy"]
    hard = result.forget[result.forget["half"] == "hard"]
    assert len(easy) == len(hard) == 5 and easy["cud"].max() < hard["cud"].min()
    assert result.settings["runs"]["easy"]["steps"] == result.settings["runs"]["hard"]["steps"]
    assert len(result.retain) == 10 and len(result.general) == 6
    assert {"forget NLL increase", "share forgotten", "retain NLL increase",
            "general NLL increase"} <= set(result.tests["quantity"])
    p = result.tests["p"].dropna()
    assert len(p) >= 3 and ((p >= 0) & (p <= 1)).all()
    assert list(result.summary["half"]) == ["easy", "hard"]
    # the model given is left untouched
    for k, v in lm.model.state_dict().items():
        assert (v == before[k]).all()
