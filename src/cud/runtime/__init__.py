"""Runtime: the resumable result store (and, later, distributed execution)."""

from cud.runtime.store import (FORMAT_VERSION, CircuitSet, CircuitStore, load_circuits,
                               settings_hash, text_hash)

__all__ = ["CircuitStore", "CircuitSet", "load_circuits", "settings_hash", "text_hash",
           "FORMAT_VERSION"]
