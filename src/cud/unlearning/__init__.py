"""Fine-tuning, unlearning methods over one shared training loop, and per-sample outcomes.

The ground truth CUD is judged against: teach a model a QA set (:func:`finetune`), unlearn a
forget set with one of six methods (:func:`unlearn`), and measure per sample what changed
(:func:`evaluate_outcomes`, :func:`outcome_deltas`); :func:`unlearn_to_folder` is the stage
(`cud unlearn`): every method on one forget set, written to a folder and resumable.
"""

from cud.unlearning.finetune import FinetuneResult, FinetuneSettings, finetune
from cud.unlearning.folder import UnlearningRun, UnlearningSettings, unlearn_to_folder
from cud.unlearning.loop import TrainConfig, TrainLog, train
from cud.unlearning.methods import METHODS, UnlearningMethod, make_method
from cud.unlearning.outcomes import (ALL_METRICS, METRICS, evaluate_outcomes, forget_quality,
                                     forgetting_scores, model_utility, outcome_deltas,
                                     save_outcomes, truth_ratios)
from cud.unlearning.hyperparameters import DEFAULT_TABLE, TABLES, hyperparameters
from cud.unlearning.run import UnlearningResult, spread, steps_to_forget, unlearn

__all__ = ["finetune", "FinetuneSettings", "FinetuneResult", "TrainConfig", "TrainLog", "train",
           "METHODS", "UnlearningMethod", "make_method", "METRICS", "ALL_METRICS",
           "evaluate_outcomes", "forget_quality", "forgetting_scores", "model_utility",
           "outcome_deltas", "save_outcomes", "truth_ratios", "TABLES", "DEFAULT_TABLE",
           "hyperparameters", "UnlearningResult", "spread", "steps_to_forget", "unlearn",
           "UnlearningSettings", "UnlearningRun", "unlearn_to_folder"]
