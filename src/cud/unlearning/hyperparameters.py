"""Named tables of the unlearning methods' hyperparameters (``[unlearning] hyperparameters`` of
`cud run`, ``--hyperparameters`` of `cud unlearn`). Not to be confused with the presets of a
whole run (:data:`cud.config.PRESETS`), which pick one of these tables among other things.

``paper``: the reference setup of METHOD §5 (TOFU forget10, Llama-3.2-1B-Instruct, effective batch
32 = 8 x 4 accumulation, weight decay 0.01, one warm-up epoch, linear decay).
``quick``: the project's default for a small model on the built-in data (SmolLM2-135M on CPU):
a few optimizer steps at a learning rate large enough to move a 135M model in a couple of
minutes, tuned so that a run forgets some samples and not others (the spread CUD needs).
``tofu``: the ``tofu`` run preset (TOFU forget10 on SmolLM2 fine-tuned on forget + 20 retain
authors, bf16 on CPU): one epoch (50 steps of 8) per method. GradDiff's rate was calibrated on that
model (400 forget samples): 5e-5 raised the forget NLL by a median 0.34 nats and forgot 6 % of the
samples (answer probability < 0.1), 1e-4 by a median 3.1 nats (10th-90th percentile 1.4-7.3)
and forgot 71 % with the retain NLL up by a median 0.59 (fp32 products, batches in random
order). In bf16 products with length-grouped batches the same 1e-4 collapsed the same
fine-tuned model instead (forget NLL up a median 22 nats, every sample forgotten, retain NLL up
6.0), while fp32 products in random order gave a median +1.9 nats (10th-90th percentile
0.8-3.6), 40 % forgotten, retain NLL +0.57 (notes/tofu.md): the ``tofu`` run preset unlearns in
that path. The other methods' rates are set by analogy with ``quick`` (not calibrated on TOFU).
"""

from __future__ import annotations

from dataclasses import replace

from cud.errors import ConfigError
from cud.unlearning.loop import TrainConfig

_PAPER_BATCH = dict(batch_size=8, grad_accum=4, weight_decay=0.01, schedule="linear")

#: table -> method -> (method hyperparameters, training settings)
TABLES: dict[str, dict[str, tuple[dict, TrainConfig]]] = {
    "paper": {
        "ga": ({}, TrainConfig(lr=1e-5, epochs=10, warmup=0.1, **_PAPER_BATCH)),
        "graddiff": ({"alpha": 5.0}, TrainConfig(lr=1e-5, epochs=10, warmup=0.1, **_PAPER_BATCH)),
        "npo": ({"beta": 0.5, "alpha": 1.0},
                TrainConfig(lr=1e-5, epochs=10, warmup=0.1, **_PAPER_BATCH)),
        "simnpo": ({"beta": 3.5, "alpha": 1.0, "gamma": 0.25},
                   TrainConfig(lr=5e-5, epochs=5, warmup=0.2, **_PAPER_BATCH)),
        "rmu": ({"layer": 10, "coefficient": 100.0, "alpha": 1.0},
                TrainConfig(lr=2e-5, epochs=5, warmup=0.2, **_PAPER_BATCH)),
        "undial": ({"beta": 10.0, "alpha": 2.0},
                   TrainConfig(lr=1e-4, epochs=10, warmup=0.1, **_PAPER_BATCH)),
    },
}

_QUICK_BATCH = dict(batch_size=8, grad_accum=1, weight_decay=0.01, schedule="constant", warmup=2,
                    epochs=2)
TABLES["quick"] = {
    "ga": ({}, TrainConfig(lr=3e-5, **_QUICK_BATCH)),
    "graddiff": ({"alpha": 1.0}, TrainConfig(lr=3e-5, **_QUICK_BATCH)),
    "npo": ({"beta": 0.5, "alpha": 1.0}, TrainConfig(lr=3e-5, **_QUICK_BATCH)),
    "simnpo": ({"beta": 3.5, "alpha": 1.0, "gamma": 0.25}, TrainConfig(lr=5e-5, **_QUICK_BATCH)),
    # coefficient None: 2x the layer's mean hidden-state norm (SmolLM2's are ~230 at layer 19)
    "rmu": ({"layer": None, "coefficient": None, "alpha": 1.0},
            TrainConfig(lr=5e-4, **_QUICK_BATCH)),
    "undial": ({"beta": 10.0, "alpha": 2.0}, TrainConfig(lr=1e-4, **_QUICK_BATCH)),
}

_TOFU_BATCH = dict(batch_size=8, grad_accum=1, weight_decay=0.01, schedule="constant", warmup=2,
                   epochs=1)
TABLES["tofu"] = {
    "ga": ({}, TrainConfig(lr=1e-4, **_TOFU_BATCH)),
    "graddiff": ({"alpha": 1.0}, TrainConfig(lr=1e-4, **_TOFU_BATCH)),
    "npo": ({"beta": 0.5, "alpha": 1.0}, TrainConfig(lr=1e-4, **_TOFU_BATCH)),
    "simnpo": ({"beta": 3.5, "alpha": 1.0, "gamma": 0.25}, TrainConfig(lr=1e-4, **_TOFU_BATCH)),
    "rmu": ({"layer": None, "coefficient": None, "alpha": 1.0},
            TrainConfig(lr=5e-4, **_TOFU_BATCH)),
    "undial": ({"beta": 10.0, "alpha": 2.0}, TrainConfig(lr=1e-4, **_TOFU_BATCH)),
}
DEFAULT_TABLE = "quick"


def hyperparameters(method: str, name: str = DEFAULT_TABLE) -> tuple[dict, TrainConfig]:
    """(hyperparameters, training settings) of ``method`` in table ``name`` (copies)."""
    if name not in TABLES:
        raise ConfigError(f"unknown hyperparameter table '{name}' (choose from "
                          f"{', '.join(TABLES)})")
    table = TABLES[name]
    if method not in table:
        raise ConfigError(f"hyperparameter table '{name}' has no method '{method}' "
                          f"(choose from {', '.join(table)})")
    hyper, train = table[method]
    return dict(hyper), replace(train)
