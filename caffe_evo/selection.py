"""Natural selection: the fittest offspring of a generation survives to be the next parent.

Fitness is validation accuracy (never the reported test set), subject to an accuracy floor; ties go to the
offspring with fewer synapses, then to the earlier candidate, so selection is deterministic.
"""

from __future__ import annotations

from typing import Any


def fittest(candidates: list[dict[str, Any]], floor: float) -> dict[str, Any] | None:
    """The surviving candidate's metrics, or None when no candidate reaches ``floor``."""
    eligible = [c for c in candidates if c["val_accuracy"] >= floor]
    if not eligible:
        return None
    return max(eligible, key=lambda c: (c["val_accuracy"], -c["synapses"], -c["attempt"], -c["candidate"]))


def summary(tried: list[dict[str, Any]], winner: dict[str, Any], floor: float) -> dict[str, Any]:
    """What selection saw, for the generation's ``metrics.json``."""
    return {
        "floor": floor,
        "winner": [winner["attempt"], winner["candidate"]],
        "candidates": [
            {
                "attempt": c["attempt"],
                "candidate": c["candidate"],
                "val_accuracy": c["val_accuracy"],
                "synapses": c["synapses"],
                "eligible": c["val_accuracy"] >= floor,
            }
            for c in tried
        ],
    }
