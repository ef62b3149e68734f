"""Natural selection: the fittest offspring of a generation survive to be the next parents.

Fitness is a validation metric of the candidate's ``metrics.json`` (never the reported test set),
``val_accuracy`` unless told otherwise (a detector's ``val_mAP``), and a candidate must reach the floor
on that metric to be eligible. An optional efficiency penalty makes selection prefer the smaller of two
near-equal candidates by more than a tie-break: ``score = metric - penalty * log2(size)``, where size is
the candidate's living synapses (default) or clusters, i.e. halving it is worth ``penalty`` of the
metric. Ties go to fewer synapses, then to the earlier attempt and candidate, so selection is
deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from caffe_evo.errors import CaffeEvoError

SIZES = ("synapses", "clusters")


@dataclass(frozen=True)
class Fitness:
    metric: str = "val_accuracy"
    penalty: float = 0.0  # metric lost per doubling of the size
    size: str = "synapses"  # what the penalty counts: "synapses" or "clusters" (whole kernels and units)

    def __post_init__(self) -> None:
        if not self.metric:
            raise CaffeEvoError("the fitness metric must name a key of metrics.json, e.g. val_accuracy")
        if not 0.0 <= self.penalty < math.inf:
            raise CaffeEvoError(f"--fitness-penalty must be a non-negative number, got {self.penalty}")
        if self.size not in SIZES:
            raise CaffeEvoError(f"--fitness-size must be one of {', '.join(SIZES)}, got {self.size!r}")

    def value(self, metrics: dict[str, Any]) -> float:
        """The raw metric, which the floor applies to."""
        if self.metric not in metrics:
            numeric = sorted(k for k, v in metrics.items() if k.startswith("val_") and isinstance(v, float))
            raise CaffeEvoError(
                f"fitness metric {self.metric!r} is not in the metrics (has: {', '.join(numeric)})"
            )
        return float(metrics[self.metric])

    def score(self, metrics: dict[str, Any]) -> float:
        return self.value(metrics) - self.penalty * math.log2(max(metrics[self.size], 1))

    def rank(self, candidates: list[dict[str, Any]], floor: float) -> list[dict[str, Any]]:
        """The candidates that reach ``floor``, fittest first."""
        eligible = [c for c in candidates if self.value(c) >= floor]
        return sorted(eligible, key=lambda c: (-self.score(c), c["synapses"], c["attempt"], c["candidate"]))

    def summary(self, tried: list[dict[str, Any]], survivors: list[dict[str, Any]], floor: float) -> dict:
        """What selection saw, for the generation's ``metrics.json``."""
        return {
            "metric": self.metric,
            "penalty": self.penalty,
            "size": self.size,
            "floor": floor,
            "winner": [survivors[0]["attempt"], survivors[0]["candidate"]],
            "survivors": [[c["attempt"], c["candidate"]] for c in survivors],
            "candidates": [
                {
                    "attempt": c["attempt"],
                    "candidate": c["candidate"],
                    self.metric: self.value(c),
                    "score": self.score(c),
                    "synapses": c["synapses"],
                    "clusters": c["clusters"],
                    "eligible": self.value(c) >= floor,
                }
                for c in tried
            ],
        }
