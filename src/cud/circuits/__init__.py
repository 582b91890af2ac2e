"""Per-sample circuits (METHOD §1-3): the graph and its names, one residual-stream pass with
patching, recording and interpolation, edge attribution (EAP / EAP-IG), selection,
faithfulness, structure statistics, and the resumable store.

The stage itself is :func:`find_circuits` (`cud circuits`) with its :class:`CircuitSettings`;
:func:`load_circuits` reads a circuits folder back.
"""

from cud.circuits.graph import Graph
from cud.circuits.pipeline import CircuitRun, find_circuits
from cud.circuits.settings import CircuitSettings
from cud.circuits.store import CircuitSet, load_circuits

__all__ = ["Graph", "CircuitSettings", "CircuitRun", "find_circuits", "CircuitSet",
           "load_circuits"]
