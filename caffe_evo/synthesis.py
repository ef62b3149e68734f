"""Offspring synthesis: the environment scales the DNA's probabilities, then one seeded Bernoulli draw.

``P(H_g) = F(E) . P(S_g | W_{g-1})`` (METHOD.md sections 1-2). F is offered two ways: literally, as a
multiplier of every probability, and as a target survival rate per layer. The literal multiplier
collapsed LeNet-5 within four generations on this project's machines, while calibrating to a survival
rate shrank it steadily, hence both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from caffe_evo.encoding import LayerDNA, Masks, expand_clusters, living_clusters
from caffe_evo.errors import CaffeEvoError

MODES = ("multiplier", "survival")


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

    mode "multiplier" is the literal ``p' = F * p``. Mode "survival" rescales each layer's probabilities
    so that the expected fraction of its living units that survive is F.
    """

    values: tuple[float, ...]
    mode: str = "survival"

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

    def at(self, generation: int) -> float:
        """F for ``generation`` (1 = the ancestor's first offspring)."""
        if generation < 1:
            raise CaffeEvoError(f"generation must be >= 1, got {generation}")
        return self.values[min(generation, len(self.values)) - 1]

    def apply(self, probs: np.ndarray, living: np.ndarray, generation: int) -> np.ndarray:
        """Effective survival probabilities of one layer's units; 0 where the unit is already dead."""
        if probs.shape != living.shape:
            raise CaffeEvoError(
                f"probabilities {probs.shape} and living units {living.shape} differ in shape"
            )
        factor = self.at(generation)
        if self.mode == "multiplier":
            return np.where(living, factor * probs, 0.0)
        effective = np.zeros(probs.shape)
        effective[living] = _calibrated(probs[living], factor)
        return effective

    @classmethod
    def parse(cls, text: str, mode: str) -> Factor:
        """From the command line: ``"0.7"`` or a schedule ``"0.9,0.8,0.7"``."""
        return cls(parse_schedule(text, "environmental factor"), mode)


def parse_schedule(text: str, what: str) -> tuple[float, ...]:
    """``"0.7"`` or ``"0.9,0.8,0.7"`` (one value per generation) as floats, or one clear error."""
    try:
        return tuple(float(part) for part in str(text).split(","))
    except ValueError:
        raise CaffeEvoError(f"{what} '{text}' is not a number or a comma-separated schedule") from None


@dataclass(frozen=True)
class Environment:
    """Separate factors for the cluster and the synapse level (cluster-driven synthesis, 2016/2017)."""

    synapse: Factor
    cluster: Factor


def _keep_outputs(alive: np.ndarray, parent: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Give each output neuron that lost every input synapse back its most probable parent synapse.

    Protecting clusters is not enough for the classifier: the synapse draw can still empty a surviving
    cluster, and an output without inputs would be removed as dead.
    """
    rows = alive.reshape(alive.shape[0], -1).copy()
    lost = np.flatnonzero(parent.reshape(rows.shape).any(axis=1) & ~rows.any(axis=1))
    best = np.where(parent, probs, -1.0).reshape(rows.shape).argmax(axis=1)
    rows[lost, best[lost]] = True
    return rows.reshape(alive.shape)


def sample_offspring(
    dna: dict[str, LayerDNA],
    parent_masks: Masks,
    env: Environment,
    generation: int,
    rng: np.random.Generator,
    protected: frozenset[str] = frozenset(),
) -> Masks:
    """Sample the offspring's masks: clusters survive or die whole, then synapses individually.

    Dead parent synapses stay dead (heredity). Random numbers are consumed in the same pattern for every
    layer, protected or not, so that protecting a layer does not change the draws of the others.
    Protected layers keep every living cluster and at least one input synapse per living output neuron.
    The offspring covers the DNA's layers only; other parent masks and protected names are ignored.
    """
    missing = [name for name in dna if name not in parent_masks]
    if missing:
        raise CaffeEvoError(f"no parent mask for layers: {', '.join(missing)}")
    offspring: Masks = {}
    for name, layer in dna.items():
        parent = parent_masks[name]
        if parent.dtype != np.bool_ or parent.shape != layer.synapse.shape:
            raise CaffeEvoError(
                f"layer '{name}': parent mask ({parent.dtype}, {parent.shape}) does not match its DNA "
                f"(bool, {layer.synapse.shape})"
            )
        alive = parent.copy()
        if layer.cluster is not None:
            granularity = "kernel" if layer.cluster.ndim == 1 else "channel"
            living = living_clusters(parent, granularity)
            survives = rng.random(layer.cluster.shape) < env.cluster.apply(layer.cluster, living, generation)
            if name in protected:
                survives = living
            alive &= expand_clusters(survives, parent.shape, granularity)
        alive &= rng.random(parent.shape) < env.synapse.apply(layer.synapse, parent, generation)
        if name in protected:
            alive = _keep_outputs(alive, parent, layer.synapse)
        offspring[name] = alive
    return offspring
