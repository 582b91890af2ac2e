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
from cud.limits import check_count, check_seed

#: the most integration steps, corrupted-prompt draws and samples per pass a run may ask for:
#: each step and draw is a pass over every sample, so a larger value is a typo that would run
#: for days (the paper's EAP-IG uses 5 to 100 steps)
MAX_STEPS = 1000
MAX_DRAWS = 1000
MAX_BATCH = 65_536


@dataclass(frozen=True)
class CircuitSettings:
    """How every sample's circuit is found.

    - ``method``, ``steps``, ``metric``, ``convention``: the attribution
      (:mod:`cud.circuits.attribution`);
    - ``ablation``: what a patched edge carries (``corrupt``: activations on the question with
      its tokens replaced at random; ``zero``; ``mean``: over the ``reference`` data set);
      ``draws`` corrupted prompts per sample are averaged into one ablation, seeded by the
      sample id and ``seed`` (the other ablations have no draws);
    - ``selection``, ``n_edges``, ``threshold``: from scores to a circuit
      (:mod:`cud.circuits.selection`);
    - ``faithfulness``: also measure each circuit's faithfulness, and that of the greedy
      circuits of every size in ``faithfulness_sizes`` (one patched pass each: how faithful
      the circuits of each size are, e.g. to choose a size; nothing without faithfulness);
    - ``batch_size``: samples per pass; part of the result (a batch rounds differently), so a
      folder is resumed only with the batch size it was started with.

    Maxima: :data:`MAX_STEPS`, :data:`MAX_DRAWS`, :data:`MAX_BATCH`; ``seed`` in 0..2^32-1.
    """

    method: str = "eap-ig-activations"
    steps: int = 5
    metric: str = "kl"
    #: ``cud`` or ``reference`` (the reference EAP-IG code's conventions; README)
    convention: str = "cud"
    ablation: str = "corrupt"
    #: 4 corrupted prompts averaged and 1000-edge circuits: CUD's test-retest reliability on
    #: the default run rose from 0.30 (1 draw, the paper's 75 edges) to 0.91 (see the notes)
    draws: int = 4
    seed: int = 0
    reference: str | None = None
    selection: str = "greedy"
    n_edges: int = 1000
    threshold: float | None = None
    faithfulness: bool = True
    faithfulness_sizes: tuple[int, ...] = (75, 300, 3000)
    batch_size: int = 8

    def __post_init__(self):
        check_count(self.steps, "steps", MAX_STEPS)
        check_count(self.draws, "draws", MAX_DRAWS)
        check_count(self.batch_size, "batch_size", MAX_BATCH)
        check_seed(self.seed)
        self.attribution, self.selector  # validated there
        if self.ablation not in ABLATIONS:
            raise ConfigError(f"unknown ablation '{self.ablation}' "
                              f"(choose from {', '.join(ABLATIONS)})")
        if self.ablation == "mean" and not self.reference:
            raise ConfigError("the mean ablation needs a reference set (--reference DATA)")
        if any(n < 1 for n in self.faithfulness_sizes):
            raise ConfigError("faithfulness_sizes must be circuit sizes of at least 1 edge")
        check_method_and_ablation(self.method, self.ablation, self.convention == "reference")

    @property
    def attribution(self) -> AttributionSettings:
        return AttributionSettings(method=self.method, steps=self.steps, metric=self.metric,
                                   convention=self.convention)

    @property
    def selector(self) -> SelectionSettings:
        return SelectionSettings(selection=self.selection, n_edges=self.n_edges,
                                 threshold=self.threshold)

    def to_dict(self) -> dict:
        return asdict(self)

