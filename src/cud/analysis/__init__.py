"""Analysis of circuits' structure against difficulty: group comparisons (Mann-Whitney U with
Cliff's delta), Spearman correlations, and the structure analysis of ``cud analyze``."""

from cud.analysis.compare import (MIN_SAMPLES, VERDICTS, GroupTest, cliffs_delta, compare_groups,
                                  correlations, cud_groups, holm, mann_whitney, verdict)
from cud.analysis.stage import AnalysisSettings, analyze_to_folder
from cud.analysis.signature import (PAPER_EXPECTATIONS, StructureAnalysis, analyze_structure,
                                    anchor_ids)

__all__ = ["GroupTest", "MIN_SAMPLES", "VERDICTS", "cliffs_delta", "compare_groups",
           "correlations", "cud_groups", "holm", "mann_whitney", "verdict",
           "PAPER_EXPECTATIONS", "StructureAnalysis", "analyze_structure", "anchor_ids",
           "AnalysisSettings", "analyze_to_folder"]
