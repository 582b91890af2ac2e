"""Runtime: distributed execution of the stages on Ray (:mod:`cud.runtime.distributed`) and
process-wide memory settings for long CPU runs (:mod:`cud.runtime.memory`)."""
