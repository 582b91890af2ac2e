"""Range checks of settings, shared by the settings classes that define them: each class calls
these in its ``__post_init__`` with its own stated maximum, so a bad value is refused when the
settings are made (before any stage writes), with the setting's name.

Seeds are 32-bit unsigned (what NumPy, PyTorch and Python's ``random`` all accept alike)."""

from __future__ import annotations

import math

from cud.errors import ConfigError, shown

#: the largest seed: every generator cud seeds (random, NumPy, PyTorch) takes 0..2^32-1
MAX_SEED = 2**32 - 1


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {shown(value)}")
    return value


def check_seed(value, name: str = "seed") -> None:
    """A whole number in 0..2^32-1."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{name} must be a whole number from 0 to {MAX_SEED}, got {shown(value)}")


def check_rate(value, name: str) -> None:
    """A finite number above 0 (a learning rate, a noise scale)."""
    _number(value, name)
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a finite number above 0, got {shown(value)}")


def check_count(value, name: str, maximum: int, minimum: int = 1) -> None:
    """A whole number from ``minimum`` to ``maximum`` (steps, sizes, draws)."""
    if isinstance(value, bool) or not isinstance(value, int) or \
            not minimum <= value <= maximum:
        raise ConfigError(f"{name} must be a whole number from {minimum} to {maximum}, "
                          f"got {shown(value)}")


def check_amount(value, name: str, maximum: float) -> None:
    """A finite number above 0 and at most ``maximum`` (epochs)."""
    _number(value, name)
    if not (math.isfinite(value) and 0 < value <= maximum):
        raise ConfigError(f"{name} must be a number above 0 and at most {maximum:g}, "
                          f"got {shown(value)}")


def check_probability(value, name: str) -> None:
    """A number strictly between 0 and 1."""
    _number(value, name)
    if not 0 < value < 1:  # NaN fails too
        raise ConfigError(f"{name} must be a probability strictly between 0 and 1, "
                          f"got {shown(value)}")
