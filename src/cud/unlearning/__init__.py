"""Fine-tuning, unlearning methods over one shared training loop, and per-sample outcomes.

The ground truth CUD is judged against: teach a model a QA set (:func:`finetune`), unlearn a
forget set with one of six methods (:func:`unlearn`), and measure per sample what changed
(:func:`evaluate_outcomes`, :func:`outcome_deltas`).
"""

from cud.unlearning.finetune import FinetuneConfig, FinetuneResult, finetune
from cud.unlearning.general import general_knowledge
from cud.unlearning.loop import TrainConfig, TrainLog, train
from cud.unlearning.methods import METHODS, UnlearningMethod, make_method
from cud.unlearning.outcomes import (ALL_METRICS, METRICS, add_perturbed_answers,
                                     evaluate_outcomes, forget_quality, forgetting_scores,
                                     model_utility, outcome_deltas, save_table,
                                     teacher_forced_outcomes, truth_ratios)
from cud.unlearning.presets import DEFAULT_PRESET, PRESETS, preset
from cud.unlearning.run import (UnlearningResult, split_forget_retain, spread, steps_to_forget,
                                unlearn)

__all__ = ["finetune", "FinetuneConfig", "FinetuneResult", "general_knowledge", "TrainConfig",
           "TrainLog", "train", "METHODS", "UnlearningMethod", "make_method", "METRICS",
           "ALL_METRICS", "add_perturbed_answers", "evaluate_outcomes", "forget_quality",
           "forgetting_scores", "model_utility", "outcome_deltas", "save_table",
           "teacher_forced_outcomes", "truth_ratios", "PRESETS", "DEFAULT_PRESET", "preset",
           "UnlearningResult", "split_forget_retain", "spread", "steps_to_forget", "unlearn"]
