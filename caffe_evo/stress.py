"""Stress-induced synthesis (StressedNets, 2018): stress signals on the synapses during training.

The paper's exact formula could not be read (METHOD.md section 5); this is the reconstruction it asks for.
Every ``period`` iterations the current weights are encoded, the synapses (or whole clusters) that the
next evolution step would remove are sampled from that encoding under the run's environment, and those
synapses are attenuated by ``strength`` s for that iteration's forward and backward pass (s = 0 drops
them). Their stored values are restored before the solver's update, so the network learns to do without
the likely-to-die synapses while the survivors' weights change only through training. Pruned synapses
are never touched (they are not living, so never sampled), and nothing happens when stress is off.
BatchNorm updates its running statistics in the forward pass; a stressed pass would fold the attenuated
network's statistics into them, so they are restored with the weights: the statistics only ever see the
network that is actually trained.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from caffe_evo.batchnorm import BATCHNORM, layers_of_type
from caffe_evo.caffe_env import add_solver_callback
from caffe_evo.encoding import EncodingConfig, encode
from caffe_evo.errors import CaffeEvoError
from caffe_evo.synthesis import Environment, Factor, sample_offspring

LEVELS = ("off", "synapse", "cluster")


@dataclass(frozen=True)
class StressConfig:
    """What the stress removes (level), how hard (s per generation; the last repeats), how often (k)."""

    level: str = "off"
    strength: tuple[float, ...] = (0.0,)
    period: int = 10

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise CaffeEvoError(f"unknown stress level {self.level!r}; choose from {', '.join(LEVELS)}")
        try:
            strength = tuple(float(s) for s in self.strength)
        except (TypeError, ValueError):
            raise CaffeEvoError(f"stress strength must be numbers in [0, 1), got {self.strength!r}") from None
        if not strength or any(not 0.0 <= s < 1.0 for s in strength):
            raise CaffeEvoError(f"stress strength must be in [0, 1), got {self.strength!r}")
        object.__setattr__(self, "strength", strength)
        if self.period < 1:
            raise CaffeEvoError(f"stress period must be at least 1 iteration, got {self.period}")

    def strength_at(self, generation: int) -> float:
        return self.strength[min(generation, len(self.strength)) - 1]

    @property
    def active(self) -> bool:
        return self.level != "off"


@dataclass
class StressSignal:
    """Solver callbacks that impose the stress on a training run of generation ``generation``."""

    config: StressConfig
    encoding: EncodingConfig
    environment: Environment
    generation: int  # the generation being trained; the stress anticipates generation + 1
    masks: dict[str, np.ndarray]  # the evolving layers' synapse masks
    protected: frozenset[str]
    rng: np.random.Generator
    # per layer, the Eltwise-tied class of each output map (caffe_evo.dependency.tied_channels): the stress
    # removes what synthesis would, so a tied class is drawn once, as in the offspring
    ties: dict[str, np.ndarray] = field(default_factory=dict)
    hits: list[tuple[int, int]] = field(default_factory=list)  # (iteration, synapses attenuated)
    _net: Any = None
    # (layer, blob, index, stored values): restored through the blob read again, as pycaffe's ``.data`` is
    # a CPU view that a GPU pass leaves stale (as caffe_evo.masking.GradientMask reads it every time)
    _saved: list[tuple[str, int, Any, np.ndarray]] = field(default_factory=list)
    _solver: Any = None

    def attach(self, solver: Any) -> StressSignal:
        self._solver, self._net = solver, solver.net
        add_solver_callback(solver, self)
        return self

    def _removal(self) -> dict[str, np.ndarray]:
        """The living synapses that the next evolution step would remove, drawn from the current weights."""
        weights = {name: self._net.params[name][0].data for name in self.masks}
        level_encoding = dataclasses.replace(self.encoding, level=self.config.level)
        env = self.environment  # a synapse-level encoding has no cluster draw
        if self.config.level == "cluster":
            env = dataclasses.replace(env, synapse=Factor((1.0,)), layer_synapse={})
        dna = encode(weights, self.masks, level_encoding, self.protected)
        survivors = sample_offspring(
            dna, self.masks, env, self.generation + 1, self.rng, self.protected, self.ties
        )
        return {name: self.masks[name] & ~survivors[name] for name in self.masks}

    def on_start(self) -> None:
        if self._solver.iter % self.config.period:
            return
        strength = self.config.strength_at(self.generation)
        total = 0
        for name, removed in self._removal().items():
            data = self._net.params[name][0].data
            index = np.nonzero(removed)
            self._saved.append((name, 0, index, data[index].copy()))
            data[index] *= strength
            total += len(index[0])
        for name in layers_of_type(self._net, BATCHNORM):
            self._saved += [(name, i, Ellipsis, b.data.copy()) for i, b in enumerate(self._net.params[name])]
        self.hits.append((int(self._solver.iter), total))

    def on_gradients_ready(self) -> None:
        for name, blob, index, original in self._saved:
            self._net.params[name][blob].data[index] = original
        self._saved.clear()

    def summary(self) -> dict[str, Any]:
        counts = [n for _, n in self.hits]
        return {
            "level": self.config.level,
            "strength": self.config.strength_at(self.generation),
            "period": self.config.period,
            "stressed_iterations": len(self.hits),
            "mean_synapses_stressed": float(np.mean(counts)) if counts else 0.0,
        }
