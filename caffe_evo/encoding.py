"""The genetic encoding ("DNA"): how likely each synapse and each synaptic cluster is to be inherited.

Strong synapses and clusters are likely to survive into the offspring (Shafiee, Wong et al., "Deep
Learning with Darwin" 2016 and the cluster-driven papers 2016/2017). The encoding is pure numpy over the
weight arrays and their masks, so it is independent of Caffe and cheap to test.

Weights are Caffe's: Convolution ``(out, in, kh, kw)``, InnerProduct ``(out, in)``. A mask is a bool
array of the weight's shape, True where the synapse is alive. Every loop follows dict order (net order),
which is what makes seeded sampling reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from caffe_evo.errors import CaffeEvoError

Params = dict[str, np.ndarray]
Masks = dict[str, np.ndarray]

OPTIONS: dict[str, tuple[str, ...]] = {
    "level": ("synapse", "cluster"),
    "reading": ("exp_shifted", "exp_minus_one"),
    "normaliser": ("max", "rms"),
    "aggregate": ("sum", "l2", "mean"),
    "granularity": ("kernel", "channel"),
    "strength": ("weights", "bn_folded"),
}


@dataclass(frozen=True)
class EncodingConfig:
    """Which of the variants found in the literature to use (METHOD.md sections 1-2).

    - level: "synapse" samples synapses only (Darwin 2016); "cluster" first samples clusters as a whole.
    - reading: "exp_shifted" is ``exp(|w|/Z - 1)``, "exp_minus_one" is ``exp(|w|/Z) - 1``; both clipped
      to [0, 1]. The papers are read both ways, so both are offered.
    - normaliser: the per-layer synapse normaliser Z over living synapses, "max" or "rms" of ``|w|``.
      Clusters are always normalised by the layer's largest living cluster strength.
    - aggregate: a cluster's strength from its living synapses: "sum" of ``|w|``, "l2" norm, "mean" ``|w|``.
    - granularity: a cluster is one output map/neuron ("kernel", shape ``(out,)``) or the 2-D kernel of
      one (output, input) pair ("channel", shape ``(out, in)``; a single synapse for InnerProduct).
    - strength: what ``|w|`` is read from: the layer's "weights", or "bn_folded", the weights as the
      BatchNorm and Scale after the layer scale them (``w * gamma / sqrt(var + eps)`` per output map,
      :func:`caffe_evo.batchnorm.folded_weights`), which is what a map contributes downstream.
    """

    level: str = "cluster"
    reading: str = "exp_shifted"
    normaliser: str = "max"
    aggregate: str = "sum"
    granularity: str = "kernel"
    strength: str = "weights"

    def __post_init__(self) -> None:
        for option, allowed in OPTIONS.items():
            value = getattr(self, option)
            if value not in allowed:
                raise CaffeEvoError(f"encoding {option} '{value}' is not one of: {', '.join(allowed)}")


@dataclass
class LayerDNA:
    """One layer's encoding: survival probabilities per synapse and, at cluster level, per cluster."""

    synapse: np.ndarray
    cluster: np.ndarray | None


def _member_axes(ndim: int, granularity: str) -> tuple[int, ...]:
    """The weight axes that a cluster spans: everything after ``out`` (kernel) or after ``(out, in)``."""
    if granularity not in OPTIONS["granularity"]:
        raise CaffeEvoError(f"granularity '{granularity}' is not one of: {', '.join(OPTIONS['granularity'])}")
    return tuple(range(1 if granularity == "kernel" else 2, ndim))


def _living_abs(weights: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``|w|`` in float64 with dead synapses at 0, after checking that weights and mask belong together.

    Dead synapses should already be zero after masked training, but the mask is what defines them.
    """
    if mask.dtype != np.bool_:
        raise CaffeEvoError(f"mask must be bool, got {mask.dtype}")
    if weights.shape != mask.shape:
        raise CaffeEvoError(f"mask shape {mask.shape} does not match weight shape {weights.shape}")
    if weights.ndim < 2:
        raise CaffeEvoError(f"weights must be (out, in, ...), got shape {weights.shape}")
    return np.where(mask, np.abs(weights.astype(np.float64)), 0.0)


def _read(normalised: np.ndarray, reading: str) -> np.ndarray:
    """Strength normalised to about [0, 1] -> probability in [0, 1].

    Inputs above 1 give probability 1 under both readings, so capping them first avoids exp overflow
    when the rms normaliser meets an outlier.
    """
    x = np.minimum(normalised, 1.0)
    p = np.exp(x - 1.0) if reading == "exp_shifted" else np.expm1(x)
    return np.minimum(p, 1.0)


def synapse_probabilities(weights: np.ndarray, mask: np.ndarray, config: EncodingConfig) -> np.ndarray:
    """``P(s_i | w_i)`` for every synapse of one layer; 0 for dead synapses and for all-zero layers."""
    strength = _living_abs(weights, mask)
    if config.normaliser == "max":
        z = float(strength.max(initial=0.0))
    else:
        living = int(mask.sum())
        z = float(np.sqrt((strength**2).sum() / living)) if living else 0.0
    if z == 0.0:
        return np.zeros(weights.shape)
    return np.where(mask, _read(strength / z, config.reading), 0.0)


def cluster_strengths(weights: np.ndarray, mask: np.ndarray, config: EncodingConfig) -> np.ndarray:
    """Aggregated ``|w|`` of each cluster's living synapses; 0 for dead clusters."""
    strength = _living_abs(weights, mask)
    axes = _member_axes(weights.ndim, config.granularity)
    if config.aggregate == "sum":
        return strength.sum(axis=axes)
    if config.aggregate == "l2":
        return np.sqrt((strength**2).sum(axis=axes))
    count = mask.sum(axis=axes)
    return np.divide(strength.sum(axis=axes), count, out=np.zeros(count.shape), where=count > 0)


def cluster_probabilities(weights: np.ndarray, mask: np.ndarray, config: EncodingConfig) -> np.ndarray:
    """``P(s_c | W)`` per cluster, its strength normalised by the layer's strongest living cluster."""
    strength = cluster_strengths(weights, mask, config)
    z = float(strength.max(initial=0.0))
    if z == 0.0:
        return np.zeros(strength.shape)
    return np.where(living_clusters(mask, config.granularity), _read(strength / z, config.reading), 0.0)


def living_clusters(mask: np.ndarray, granularity: str) -> np.ndarray:
    """A cluster lives while any of its synapses does: bool ``(out,)`` or ``(out, in)``."""
    return mask.any(axis=_member_axes(mask.ndim, granularity))


def expand_clusters(values: np.ndarray, weight_shape: tuple[int, ...], granularity: str) -> np.ndarray:
    """Per-cluster values broadcast to every synapse of the cluster (a read-only view, no copy)."""
    lead = weight_shape[: len(weight_shape) - len(_member_axes(len(weight_shape), granularity))]
    if values.shape != lead:
        raise CaffeEvoError(f"{granularity} clusters of weight shape {weight_shape} need shape {lead}")
    return np.broadcast_to(values.reshape(lead + (1,) * (len(weight_shape) - len(lead))), weight_shape)


def bias_mask(weight_mask: np.ndarray) -> np.ndarray:
    """Bool ``(out,)``: a neuron keeps its bias iff it keeps an input synapse, else it is removable."""
    return weight_mask.reshape(weight_mask.shape[0], -1).any(axis=1)


def encode(
    weights: Params, masks: Masks, config: EncodingConfig, protected: frozenset[str] = frozenset()
) -> dict[str, LayerDNA]:
    """The DNA of the layers in ``weights``, in their dict order.

    ``protected`` layers (the final classifier, whose outputs are the classes) give each living cluster
    probability exactly 1, so that the cluster draw never removes an output. Masks and protected names
    of layers outside ``weights`` are ignored, so that a run may evolve only some layers.
    """
    missing = [name for name in weights if name not in masks]
    if missing:
        raise CaffeEvoError(f"no mask for layers: {', '.join(missing)}")
    dna: dict[str, LayerDNA] = {}
    for name, layer_weights in weights.items():
        mask = masks[name]
        try:
            synapse = synapse_probabilities(layer_weights, mask, config)
            cluster = None
            if config.level == "cluster":
                if name in protected:
                    cluster = living_clusters(mask, config.granularity).astype(np.float64)
                else:
                    cluster = cluster_probabilities(layer_weights, mask, config)
        except CaffeEvoError as exc:
            raise CaffeEvoError(f"layer '{name}': {exc}") from None
        dna[name] = LayerDNA(synapse, cluster)
    return dna
