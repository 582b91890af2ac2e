"""The report: figures (one function each, matplotlib) and one self-contained HTML file."""

from cud.report.figures import (circuit_drawing, cud_distribution, cud_vs_outcome, figure_png,
                                layer_heatmaps, roc_curves, roc_table, structure_boxplots)
from cud.report.html import Report, ReportInputs, ReportSettings, build_report
from cud.report.inputs import load_report_inputs

__all__ = ["circuit_drawing", "cud_distribution", "cud_vs_outcome", "figure_png",
           "layer_heatmaps", "roc_curves", "roc_table", "structure_boxplots", "Report",
           "ReportInputs", "ReportSettings", "build_report", "load_report_inputs"]
