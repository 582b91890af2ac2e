"""The unlearning methods, each a small class that defines only its loss (METHOD §5)."""

from __future__ import annotations

from cud.errors import ConfigError
from cud.unlearning.methods.base import UnlearningMethod
from cud.unlearning.methods.ga import GA, GradDiff, ga_loss
from cud.unlearning.methods.npo import NPO, SimNPO, npo_loss, simnpo_loss
from cud.unlearning.methods.rmu import RMU, rmu_loss
from cud.unlearning.methods.undial import UNDIAL, undial_loss, undial_targets

#: ``--method`` name -> class
METHODS: dict[str, type[UnlearningMethod]] = {
    cls.name: cls for cls in (GA, GradDiff, NPO, SimNPO, RMU, UNDIAL)}


def make_method(name: str, **hyperparameters) -> UnlearningMethod:
    """Build a method by registry name; unknown names or hyperparameters raise ConfigError."""
    key = name.lower()
    if key not in METHODS:
        raise ConfigError(f"unknown unlearning method '{name}' (choose from {', '.join(METHODS)})")
    cls = METHODS[key]
    try:
        return cls(**hyperparameters)
    except TypeError:
        import dataclasses
        known = [f.name for f in dataclasses.fields(cls) if f.init]
        bad = sorted(set(hyperparameters) - set(known))
        raise ConfigError(f"method '{key}' has no hyperparameter {', '.join(bad)} "
                          f"(it has: {', '.join(known) or 'none'})") from None


__all__ = ["UnlearningMethod", "METHODS", "make_method", "GA", "GradDiff", "NPO", "SimNPO", "RMU",
           "UNDIAL", "ga_loss", "npo_loss", "simnpo_loss", "rmu_loss", "undial_loss",
           "undial_targets"]
