"""Published pruning baselines, as mask proposals for the same masked-training loop as evolution.

Each function maps the parent's weights and masks to the offspring's masks; training, selection,
lineage, compaction and reporting are shared with evolution (:mod:`caffe_evo.evolution`), so the
comparison differs only in how the next architecture is chosen.

- ``magnitude``: iterative magnitude pruning with retraining (Han et al. 2015, "Learning both weights
  and connections"): each round removes the given fraction of the living synapses with the smallest
  |w|, by a per-layer threshold or one global threshold.
- ``l1-filter``: one-shot L1-norm filter pruning with fine-tuning (Li et al. 2017, "Pruning Filters for
  Efficient ConvNets"): the given fraction of each layer's living output kernels with the smallest
  L1 norm is removed in generation 1, then the network is only fine-tuned (compaction then removes the
  filters physically).
- ``retrain-mask``: the "is it just the architecture?" control: a given generation's masks, trained
  from the layers' fillers.
"""

from __future__ import annotations

import numpy as np

from caffe_evo.dependency import keep_outputs
from caffe_evo.encoding import Masks, Params

METHODS = ("evolution", "magnitude", "l1-filter", "retrain-mask")
SCOPES = ("layer", "global")


def _smallest(values: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` smallest values; ties broken by position, so the result is deterministic."""
    return np.argsort(values, kind="stable")[:count]


def magnitude_masks(
    weights: Params, masks: Masks, fraction: float, scope: str, protected: frozenset[str] = frozenset()
) -> Masks:
    """Remove ``fraction`` of the living synapses with the smallest |w| (per layer, or over all layers).

    As in every method, a neuron of a ``protected`` layer (a net output) that lost every input keeps its
    strongest (:func:`caffe_evo.dependency.keep_outputs`): Han et al. prune weights, never outputs.
    """
    strength = {name: np.abs(weights[name]) for name in masks}
    return keep_outputs(_magnitude(weights, masks, fraction, scope), masks, strength, protected)


def _magnitude(weights: Params, masks: Masks, fraction: float, scope: str) -> Masks:
    if scope == "layer":
        out = {}
        for name, mask in masks.items():
            keep = mask.copy().ravel()
            living = np.flatnonzero(keep)
            magnitudes = np.abs(weights[name]).ravel()[living]
            keep[living[_smallest(magnitudes, int(round(fraction * living.size)))]] = False
            out[name] = keep.reshape(mask.shape)
        return out
    names = list(masks)
    living = [np.flatnonzero(masks[name]) for name in names]
    magnitudes = np.concatenate(
        [np.abs(weights[name]).ravel()[idx] for name, idx in zip(names, living, strict=True)]
    )
    removed = _smallest(magnitudes, int(round(fraction * magnitudes.size)))
    offsets = np.cumsum([0] + [idx.size for idx in living])
    out = {}
    for i, name in enumerate(names):
        keep = masks[name].copy().ravel()
        mine = removed[(removed >= offsets[i]) & (removed < offsets[i + 1])] - offsets[i]
        keep[living[i][mine]] = False
        out[name] = keep.reshape(masks[name].shape)
    return out


def l1_filter_masks(weights: Params, masks: Masks, fraction: float, protected: frozenset[str]) -> Masks:
    """Remove ``fraction`` of each layer's living output kernels with the smallest L1 norm.

    The protected layers (the net's outputs) keep every output kernel.
    """
    out = {}
    for name, mask in masks.items():
        keep = mask.copy()
        if name not in protected:
            rows = keep.reshape(len(keep), -1)
            living = np.flatnonzero(rows.any(axis=1))
            norms = np.abs(weights[name] * mask).reshape(len(mask), -1).sum(axis=1)[living]
            rows[living[_smallest(norms, int(round(fraction * living.size)))]] = False
        out[name] = keep
    return out
