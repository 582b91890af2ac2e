"""Difficulty: baseline difficulty metrics (and, later, anchors, the CUD score and validation)."""

from cud.difficulty.baselines import (BASELINES, baseline_metrics, gradient_norms, min_k_prob, mrd,
                                      random_scores)

__all__ = ["BASELINES", "baseline_metrics", "gradient_norms", "min_k_prob", "mrd",
           "random_scores"]
