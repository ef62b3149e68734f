"""Counting what evolution removes: synapses and clusters per layer, and efficiencies as the papers report.

synaptic efficiency = #synapses(ancestor) / #synapses(offspring);
cluster efficiency = #clusters(ancestor) / #clusters(offspring) (clusters at the encoding's granularity).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from caffe_evo.encoding import living_clusters


def layer_counts(weight_masks: dict[str, np.ndarray], granularity: str) -> dict[str, dict[str, int]]:
    """Living synapses and clusters of every layer."""
    return {
        name: {
            "synapses": int(np.count_nonzero(mask)),
            "clusters": int(np.count_nonzero(living_clusters(mask, granularity))),
        }
        for name, mask in weight_masks.items()
    }


def totals(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    return {key: sum(layer[key] for layer in counts.values()) for key in ("synapses", "clusters")}


def efficiency_report(
    weight_masks: dict[str, np.ndarray], ancestor_totals: dict[str, int], granularity: str
) -> dict[str, Any]:
    """Per-layer and total counts with the ancestor-relative efficiencies, for ``metrics.json``."""
    counts = layer_counts(weight_masks, granularity)
    total = totals(counts)
    return {
        "layers": counts,
        "synapses": total["synapses"],
        "clusters": total["clusters"],
        "synaptic_efficiency": ancestor_totals["synapses"] / max(total["synapses"], 1),
        "cluster_efficiency": ancestor_totals["clusters"] / max(total["clusters"], 1),
    }
