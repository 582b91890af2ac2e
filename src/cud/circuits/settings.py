"""The settings of the circuits stage (`cud circuits`, ``[circuits]`` of `cud run`): one flat
object whose fields are the command's options and the config file's keys, each default stated
here once. Everything in it decides the result, so all of it goes into a circuits folder's
settings hash (a rerun with other settings is refused, never mixed in)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cud.circuits.ablation import ABLATIONS
from cud.circuits.attribution import AttributionSettings, check_method_and_ablation
from cud.circuits.selection import SelectionSettings
from cud.errors import ConfigError


@dataclass(frozen=True)
class CircuitSettings:
    """How every sample's circuit is found.

    - ``method``, ``steps``, ``metric``: the attribution (:mod:`cud.circuits.attribution`);
    - ``ablation``: what a patched edge carries (``corrupt``: activations on the question with
      its tokens replaced at random; ``zero``; ``mean``: over the ``reference`` data set);
      ``draws`` corrupted prompts per sample are averaged into one ablation, seeded by the
      sample id and ``seed``;
    - ``selection``, ``n_edges``, ``threshold``: from scores to a circuit
      (:mod:`cud.circuits.selection`);
    - ``faithfulness``: also measure each circuit's faithfulness;
    - ``batch_size``: samples per pass; part of the result (a batch rounds differently), so a
      folder is resumed only with the batch size it was started with.
    """

    method: str = "eap-ig-activations"
    steps: int = 5
    metric: str = "kl"
    ablation: str = "corrupt"
    draws: int = 1
    seed: int = 0
    reference: str | None = None
    selection: str = "greedy"
    n_edges: int = 75
    threshold: float | None = None
    faithfulness: bool = True
    batch_size: int = 8

    def __post_init__(self):
        self.attribution, self.selector  # validated there
        if self.ablation not in ABLATIONS:
            raise ConfigError(f"unknown ablation '{self.ablation}' "
                              f"(choose from {', '.join(ABLATIONS)})")
        if self.ablation == "mean" and not self.reference:
            raise ConfigError("the mean ablation needs a reference set (--reference DATA)")
        if self.draws < 1:
            raise ConfigError(f"draws must be at least 1, got {self.draws}")
        if self.draws > 1 and self.ablation != "corrupt":
            raise ConfigError(f"draws > 1 averages corrupted prompts: it needs --ablation "
                              f"corrupt, not {self.ablation}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        check_method_and_ablation(self.method, self.ablation)

    @property
    def attribution(self) -> AttributionSettings:
        return AttributionSettings(method=self.method, steps=self.steps, metric=self.metric)

    @property
    def selector(self) -> SelectionSettings:
        return SelectionSettings(selection=self.selection, n_edges=self.n_edges,
                                 threshold=self.threshold)

    def to_dict(self) -> dict:
        return asdict(self)

