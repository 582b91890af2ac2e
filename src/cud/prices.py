"""What an estimate cost: seconds per sample, measured in the run that made it and kept beside
it in its stage folder, so the forecast ladder (:mod:`cud.difficulty.ladder`) can put every
estimate at its price.

A stage folder's ``prices.json`` maps an estimate's name to ``{"seconds", "samples",
"seconds_per_sample", "what"}``: the wall seconds of the work that made it, the samples that work
covered, their ratio, and what was timed. A stage resumed over several sittings adds the seconds
and samples of each sitting that computed something (``accumulate``), so its price is the
average over the samples it computed, never the few seconds of reading results back.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from cud.folders import write_text

FILE = "prices.json"


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record_price(folder: str | Path, estimate: str, seconds: float, samples: int, *,
                 what: str = "", accumulate: bool = False) -> dict:
    """Write (or with ``accumulate`` add to) the price of ``estimate`` in ``folder``'s
    ``prices.json``; returns its entry. Nothing is recorded for ``samples`` < 1."""
    root = Path(folder)
    path = root / FILE
    table = _load(path)
    if samples < 1:
        return table.get(estimate, {})
    old = table.get(estimate) if accumulate else None
    total = float(seconds) + (float(old.get("seconds", 0.0)) if old else 0.0)
    n = int(samples) + (int(old.get("samples", 0)) if old else 0)
    table[estimate] = {"seconds": round(total, 4), "samples": n,
                       "seconds_per_sample": total / n, "what": what}
    root.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(table, indent=1, sort_keys=True) + "\n")
    return table[estimate]


def read_prices(folder: str | Path | None) -> dict[str, float]:
    """``{estimate: seconds per sample}`` of a stage folder (empty when it has no prices, e.g.
    one written before prices were kept)."""
    if folder is None:
        return {}
    root = Path(folder)
    if root.is_file():
        root = root.parent
    out = {}
    for name, entry in _load(root / FILE).items():
        value = entry.get("seconds_per_sample") if isinstance(entry, dict) else None
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[str(name)] = float(value)
    return out
