"""Command `circuits`: per-sample circuits of a QA set, written to an output folder."""
