"""cud: Circuit-guided Unlearning Difficulty.

Tells, before unlearning, which samples of a forget set will be hard to erase from a language
model and why, from the model's own per-sample circuits (EAP-IG). See METHOD.md of the project.

``cud.run(config)`` runs the whole pipeline (:mod:`cud.workflow`); the stages are in
:mod:`cud.models`, :mod:`cud.data`, :mod:`cud.circuits`, :mod:`cud.unlearning`,
:mod:`cud.difficulty`, :mod:`cud.analysis` and :mod:`cud.report`.
"""

from cud.errors import ConfigError, CudError, DataError, ModelError, StoreError

__version__ = "0.1.0"

__all__ = ["CudError", "DataError", "ModelError", "ConfigError", "StoreError", "run",
           "load_config", "__version__"]


def run(config=None, *, progress=None):
    """The whole pipeline on ``config`` (a RunConfig, a config file path, a dict, or None for
    the defaults); returns a :class:`cud.workflow.RunResult`."""
    from cud.workflow import run as _run
    return _run(config, progress=progress)


def load_config(path=None, overrides=None, preset=None):
    """A :class:`cud.config.RunConfig` from defaults, a preset, a file and overrides."""
    from cud.config import load_config as _load
    return _load(path, overrides, preset)
