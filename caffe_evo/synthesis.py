"""Offspring synthesis: the environment scales the DNA's probabilities, then one seeded Bernoulli draw.

``P(H_g) = F(E) . P(S_g | W_{g-1})`` (METHOD.md sections 1-2). F is offered two ways: literally, as a
multiplier of every probability, and as a target survival rate. The literal multiplier collapsed LeNet-5
within four generations on this project's machines, while calibrating to a survival rate shrank it
steadily, hence both. A survival rate is met per layer (every layer shrinks alike) or over the whole
network with one common scale, so that the encoding's own per-layer differences decide where pruning
falls: a layer whose strengths are uniform keeps more, a layer with a long tail of weak synapses loses more.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from caffe_evo.dependency import keep_outputs
from caffe_evo.encoding import LayerDNA, Masks, expand_clusters, living_clusters
from caffe_evo.errors import CaffeEvoError

MODES = ("multiplier", "survival")
SCOPES = ("layer", "network")


def _calibrated(probs: np.ndarray, target: float) -> np.ndarray:
    """``min(1, alpha * probs)`` with alpha chosen so that its mean is exactly ``target``.

    The mean is piecewise linear in alpha, so alpha is solved exactly: with the probabilities sorted in
    decreasing order and the first ``j`` of them saturated at 1, ``alpha = (n*target - j) / sum(rest)``;
    the right ``j`` is the first one whose own unit is not pushed past 1. When the units with p > 0 are
    too few to reach the target, the limit alpha -> inf applies: they all survive, the rest cannot.
    """
    n = probs.size
    positive = probs > 0
    k = int(positive.sum())
    if k <= target * n:
        return positive.astype(np.float64)
    ordered = np.sort(probs)[::-1][:k]
    rest = np.cumsum(ordered[::-1])[::-1]
    alphas = (target * n - np.arange(k)) / rest
    alpha = alphas[int(np.argmax(alphas * ordered <= 1.0))]
    return np.minimum(1.0, alpha * probs)


@dataclass(frozen=True)
class Factor:
    """An environmental factor F, constant (one value) or a per-generation schedule (the last repeats).

    mode "multiplier" is the literal ``p' = F * p``. Mode "survival" rescales the probabilities so that
    the expected fraction of the living units that survive is F: in each layer on its own (scope
    "layer"), or over the units of all layers together with one scale (scope "network").

    ``size_exponent`` g > 0 spares small layers at scope "layer": a layer with n units (its shape's
    clusters or synapses, living or dead) gets ``F ** ((n / n_max) ** g)``, n_max the largest layer's
    count, so the largest layer gets F and a layer a tenth its size loses a fraction ``0.1 ** g`` as much
    (in log survival). Small layers, like a first convolution, are bottlenecks with little redundancy.
    """

    values: tuple[float, ...]
    mode: str = "survival"
    scope: str = "layer"
    size_exponent: float = 0.0

    def __post_init__(self) -> None:
        try:
            values = tuple(float(v) for v in self.values)
        except (TypeError, ValueError):
            raise CaffeEvoError(
                f"environmental factor must be numbers in (0, 1], got {self.values!r}"
            ) from None
        object.__setattr__(self, "values", values)  # frozen: normalise lists and ints once, here
        if not values:
            raise CaffeEvoError("environmental factor needs at least one value")
        for value in values:
            if not 0.0 < value <= 1.0:
                raise CaffeEvoError(f"environmental factor must be in (0, 1], got {value}")
        if self.mode not in MODES:
            raise CaffeEvoError(f"factor mode '{self.mode}' is not one of: {', '.join(MODES)}")
        if self.scope not in SCOPES:
            raise CaffeEvoError(f"factor scope '{self.scope}' is not one of: {', '.join(SCOPES)}")
        if not 0.0 <= self.size_exponent <= 10.0:
            raise CaffeEvoError(f"size exponent must be in [0, 10], got {self.size_exponent}")

    def at(self, generation: int) -> float:
        """F for ``generation`` (1 = the ancestor's first offspring)."""
        if generation < 1:
            raise CaffeEvoError(f"generation must be >= 1, got {generation}")
        return self.values[min(generation, len(self.values)) - 1]

    def apply(self, probs: np.ndarray, living: np.ndarray, generation: int) -> np.ndarray:
        """Effective survival probabilities of one layer's units on its own; 0 where a unit is dead.

        A single layer is its own network and its own largest layer: scope and size exponent do nothing.
        """
        return self.apply_layers({"": probs}, {"": living}, generation)[""]

    def apply_layers(
        self,
        probs: dict[str, np.ndarray],
        living: dict[str, np.ndarray],
        generation: int,
        reference: Mapping[str, float] | None = None,
    ) -> dict[str, np.ndarray]:
        """Effective survival probabilities of several layers' units, at this factor's scope.

        A survival rate is met against ``reference[name]`` living units where given (several parents:
        the fittest parent's count, so that the offspring of a union of masks shrinks as one parent's
        would), else against the living units themselves.
        """
        for name, p in probs.items():
            if p.shape != living[name].shape:
                raise CaffeEvoError(
                    f"probabilities {p.shape} and living units {living[name].shape} differ in shape"
                )
        per_layer = self.scope == "layer"
        factor = {name: self.at(generation) for name in probs}
        if per_layer and self.size_exponent and probs:  # no layer may evolve at this level
            largest = max(p.size for p in probs.values())
            factor = {
                name: f ** ((probs[name].size / largest) ** self.size_exponent) for name, f in factor.items()
            }
        if self.mode == "multiplier":
            return {name: np.where(living[name], factor[name] * p, 0.0) for name, p in probs.items()}
        groups = [[name] for name in probs] if per_layer or not probs else [list(probs)]
        effective = {name: np.zeros(p.shape) for name, p in probs.items()}
        for group in groups:
            units = np.concatenate([probs[n][living[n]] for n in group])
            target = factor[group[0]]
            if reference is not None and units.size:
                target = min(1.0, target * sum(reference[n] for n in group) / units.size)
            calibrated = _calibrated(units, target)
            start = 0
            for name in group:
                count = int(np.count_nonzero(living[name]))
                effective[name][living[name]] = calibrated[start : start + count]
                start += count
        return effective

    @classmethod
    def parse(cls, text: str, mode: str, scope: str = "layer", size_exponent: float = 0.0) -> Factor:
        """From the command line: ``"0.7"`` or a schedule ``"0.9,0.8,0.7"``."""
        return cls(parse_schedule(text, "environmental factor"), mode, scope, size_exponent)


def parse_schedule(text: str, what: str) -> tuple[float, ...]:
    """``"0.7"`` or ``"0.9,0.8,0.7"`` (one value per generation) as floats, or one clear error."""
    try:
        return tuple(float(part) for part in str(text).split(","))
    except ValueError:
        raise CaffeEvoError(f"{what} '{text}' is not a number or a comma-separated schedule") from None


@dataclass(frozen=True)
class Environment:
    """Separate factors for the cluster and the synapse level (cluster-driven synthesis, 2016/2017).

    ``layer_synapse`` and ``layer_cluster`` give single layers a factor of their own, which each such
    layer meets by itself; every other layer shares the network's factor (at its scope). A small layer
    that everything downstream depends on, like a first convolution, can so be spared while the large
    layers carry the shrinking.
    """

    synapse: Factor
    cluster: Factor
    layer_synapse: Mapping[str, Factor] = field(default_factory=dict)
    layer_cluster: Mapping[str, Factor] = field(default_factory=dict)

    def effective(
        self,
        level: str,
        probs: dict[str, np.ndarray],
        living: dict[str, np.ndarray],
        generation: int,
        reference: Mapping[str, float] | None = None,
    ) -> dict[str, np.ndarray]:
        """Survival probabilities at ``level`` ("synapse" or "cluster") of the layers in ``probs``; a
        survival rate is met against ``reference``'s counts where given (:meth:`Factor.apply_layers`)."""
        shared, own = (
            (self.synapse, self.layer_synapse) if level == "synapse" else (self.cluster, self.layer_cluster)
        )
        common = [name for name in probs if name not in own]
        result = shared.apply_layers(
            {name: probs[name] for name in common},
            {name: living[name] for name in common},
            generation,
            reference,
        )
        for name in probs:
            if name in own:
                result[name] = own[name].apply_layers(
                    {name: probs[name]}, {name: living[name]}, generation, reference
                )[name]
        return {name: result[name] for name in probs}


def sample_offspring(
    dna: dict[str, LayerDNA],
    parent_masks: Masks,
    env: Environment,
    generation: int,
    rng: np.random.Generator,
    protected: frozenset[str] = frozenset(),
    ties: dict[str, np.ndarray] | None = None,
    reference_masks: Masks | None = None,
) -> Masks:
    """Sample the offspring's masks: clusters survive or die whole, then synapses individually.

    Dead parent synapses stay dead (heredity). Random numbers are consumed in the same pattern for every
    layer, protected or not, so that protecting a layer does not change the draws of the others.
    Protected layers (the net's output layers) keep every living cluster and at least one input synapse
    per living output neuron, its most probable (:func:`caffe_evo.dependency.keep_outputs`); their
    clusters take no part in a network-wide cluster calibration (they survive regardless).
    The offspring covers the DNA's layers only; other parent masks and protected names are ignored.

    ``ties`` (:func:`caffe_evo.dependency.tied_channels`) gives, per layer, the tied class of each output
    map (-1: untied). Channels that an Eltwise adds together can only leave the network together, so at
    kernel granularity a tied class survives or dies by one draw (the first member's random number, at
    the mean of its members' probabilities), and a member of a surviving class that the synapse draw
    emptied gets back its most probable parent synapse: tied channels live or die as one.

    ``reference_masks`` (several parents: the fittest parent's masks, ``parent_masks`` being the union of
    all of theirs) are what a survival rate is met against: the offspring keeps F times the fittest
    parent's living clusters and synapses, drawn from every parent's living ones.
    """
    missing = [name for name in dna if name not in parent_masks]
    if missing:
        raise CaffeEvoError(f"no parent mask for layers: {', '.join(missing)}")
    for name, layer in dna.items():
        parent = parent_masks[name]
        if parent.dtype != np.bool_ or parent.shape != layer.synapse.shape:
            raise CaffeEvoError(
                f"layer '{name}': parent mask ({parent.dtype}, {parent.shape}) does not match its DNA "
                f"(bool, {layer.synapse.shape})"
            )
    granularity = {
        name: "kernel" if layer.cluster.ndim == 1 else "channel"
        for name, layer in dna.items()
        if layer.cluster is not None
    }
    living = {name: living_clusters(parent_masks[name], g) for name, g in granularity.items()}
    evolving = [name for name in granularity if name not in protected]
    cluster_ref = synapse_ref = None
    if reference_masks is not None:
        cluster_ref = {
            name: int(living_clusters(reference_masks[name], granularity[name]).sum()) for name in evolving
        }
        synapse_ref = {name: float(reference_masks[name].sum()) for name in dna}
        # the synapse draw thins the clusters that survive, drawn already against the reference's count:
        # its rate is the reference's synapses per living cluster against the union's
        for name, count in cluster_ref.items():
            if count:
                synapse_ref[name] *= float(living[name].sum()) / count
    cluster_p = env.effective(
        "cluster",
        {name: dna[name].cluster for name in evolving},
        {name: living[name] for name in evolving},
        generation,
        cluster_ref,
    )
    synapse_p = env.effective(
        "synapse",
        {name: layer.synapse for name, layer in dna.items()},
        {name: parent_masks[name] for name in dna},
        generation,
        synapse_ref,
    )
    tied = {
        name: ids
        for name, ids in (ties or {}).items()
        if name in cluster_p and granularity[name] == "kernel" and (ids >= 0).any()
    }
    class_p = _class_probabilities(tied, cluster_p, living)
    class_draw: dict[int, float] = {}
    kept_tied: Masks = {}  # parent synapses of the surviving tied maps
    offspring: Masks = {}
    for name, layer in dna.items():
        parent = parent_masks[name]
        alive = parent.copy()
        if layer.cluster is not None:
            draw = rng.random(layer.cluster.shape)
            p = cluster_p.get(name)
            if name in tied:
                index = np.flatnonzero(tied[name] >= 0)
                ids = tied[name][index]
                pairs = zip(ids, draw[index], strict=True)
                draw[index] = [class_draw.setdefault(int(c), float(d)) for c, d in pairs]
                p = p.copy()
                p[index] = [class_p[int(c)] for c in ids]
            survives = living[name] if name in protected else draw < p
            alive &= expand_clusters(survives, parent.shape, granularity[name])
            if name in tied:
                surviving_tied = survives & (tied[name] >= 0)
                kept_tied[name] = parent & expand_clusters(surviving_tied, parent.shape, "kernel")
        alive &= rng.random(parent.shape) < synapse_p[name]
        offspring[name] = alive
    preference = {name: dna[name].synapse for name in dna}
    offspring = keep_outputs(offspring, kept_tied, preference, frozenset(kept_tied))
    return keep_outputs(offspring, parent_masks, preference, protected)


def _class_probabilities(
    tied: dict[str, np.ndarray], cluster_p: dict[str, np.ndarray], living: dict[str, np.ndarray]
) -> dict[int, float]:
    """Each tied class's survival probability: the mean over its living members (0 if none lives)."""
    total: dict[int, float] = {}
    count: dict[int, int] = {}
    for name, ids in tied.items():
        for channel in np.flatnonzero((ids >= 0) & living[name]):
            c = int(ids[channel])
            total[c] = total.get(c, 0.0) + float(cluster_p[name][channel])
            count[c] = count.get(c, 0) + 1
    classes = {int(c) for ids in tied.values() for c in ids[ids >= 0]}
    return {c: total[c] / count[c] if c in count else 0.0 for c in classes}


# How m parents' probabilities combine into the offspring's (multi-parent synthesis, "mating").
# The m-parent papers (Chung, Shafiee, Fieguth, Wong 2017-2018) synthesise the offspring from a
# combination of all parents' encodings; "mean" weighs the parents equally, which is our reading of
# them. "max" lets the most favourable parent decide (a union of their preferences), "min" keeps only
# what every parent favours (a synapse dead in any parent dies).
MATING_RULES = ("mean", "max", "min")


def check_mating(rule: str) -> None:
    if rule not in MATING_RULES:
        raise CaffeEvoError(f"unknown --mating rule {rule!r}; choose from {', '.join(MATING_RULES)}")


def combine_parents(dnas: list[dict[str, LayerDNA]], masks: list[Masks], rule: str) -> dict[str, LayerDNA]:
    """The offspring's DNA from the DNAs of m parents (``masks``: theirs, to check that they align).

    All parents descend from one ancestor, so their clusters and synapses align by index. A parent's
    dead synapse or cluster has probability 0 in its DNA and takes part in the rule as such. The
    hereditary mask, the union of the parents' masks, is :meth:`caffe_evo.evolution.Parent.mate`'s.
    """
    check_mating(rule)
    if not dnas or len(dnas) != len(masks):
        raise CaffeEvoError(f"mating needs one mask per parent DNA, got {len(dnas)} DNAs, {len(masks)} masks")
    combine = {"mean": np.mean, "max": np.max, "min": np.min}[rule]
    offspring: dict[str, LayerDNA] = {}
    for name, first in dnas[0].items():
        layers = [dna[name] for dna in dnas]
        shapes = {layer.synapse.shape for layer in layers} | {m[name].shape for m in masks}
        if len(shapes) != 1:
            raise CaffeEvoError(f"layer '{name}': parents of different shapes {sorted(shapes)} cannot mate")
        cluster = None
        if first.cluster is not None:
            cluster = combine(np.stack([layer.cluster for layer in layers]), axis=0)
        offspring[name] = LayerDNA(combine(np.stack([layer.synapse for layer in layers]), axis=0), cluster)
    return offspring
