"""Difficulty: baseline difficulty metrics, anchors, the CUD score and its held-out validation.

Direction conventions: CUD high = hard (close to the hard anchors); ground-truth difficulty high =
less forgotten by unlearning; easy anchors = most forgotten, hard anchors = least forgotten.
"""

from cud.difficulty.anchors import (AnchorCircuits, AnchorSet, anchor_circuits, anchor_pool,
                                    anchors_from_ids, anchors_from_outcomes, load_anchors)
from cud.difficulty.baselines import (BASELINE_METRICS, BaselineSettings, baseline_metrics,
                                      baselines_to_folder, gradient_norms, min_k_prob, mrd,
                                      random_scores)
from cud.difficulty.bilevel import bilevel_anchors
from cud.difficulty.groundtruth import difficulty, forgetting, read_outcomes
from cud.difficulty.predictor import circuit_features, fit_predictor
from cud.difficulty.score import DISTANCES, cud_scores, distance, score_samples
from cud.difficulty.split import easy_hard_protocol, split_halves
from cud.difficulty.stage import validate_to_folder
from cud.difficulty.study import StudyResult, StudySettings, run_study
from cud.difficulty.validation import (agreement_matrix, evaluate_pairs, held_out_pairs,
                                       orientation, validation_table)

__all__ = ["BASELINE_METRICS", "BaselineSettings", "baseline_metrics", "baselines_to_folder",
           "validate_to_folder", "gradient_norms", "min_k_prob", "mrd",
           "random_scores",
           "AnchorSet", "AnchorCircuits", "anchor_circuits", "anchor_pool", "anchors_from_ids",
           "anchors_from_outcomes", "load_anchors", "bilevel_anchors",
           "difficulty", "forgetting", "read_outcomes",
           "DISTANCES", "distance", "cud_scores", "score_samples",
           "held_out_pairs", "evaluate_pairs", "validation_table", "agreement_matrix",
           "orientation", "circuit_features", "fit_predictor",
           "StudySettings", "StudyResult", "run_study", "easy_hard_protocol", "split_halves"]
