"""Evolution on a residual net: Eltwise-tied channels live or die as one, and the compact net keeps exactly
the synapses that the masks count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from caffe_evo import lineage, masking
from caffe_evo.dependency import tied_channels
from caffe_evo.deploy.compaction import compact
from caffe_evo.encoding import LayerDNA
from caffe_evo.evolution import EvolutionConfig, read_params, start
from caffe_evo.synthesis import Environment, Factor, sample_offspring
from caffe_evo.training import WEIGHTS_FILE

RESNET_MINI = Path(__file__).parent / "fixtures" / "resnet_mini"
LAYERS = ["conv1", "a1", "a2", "b1", "b2", "proj", "fc"]


def tied_consistent(masks: dict[str, np.ndarray], ties: dict[str, np.ndarray]) -> bool:
    """Every tied class has all its member maps alive or all dead."""
    state: dict[int, set[bool]] = {}
    for name, ids in ties.items():
        alive = masks[name].reshape(len(ids), -1).any(axis=1)
        for c, a in zip(ids, alive, strict=True):
            if c >= 0:
                state.setdefault(int(c), set()).add(bool(a))
    return all(len(s) == 1 for s in state.values())


def test_tied_classes_of_the_fixture() -> None:
    ties = tied_channels(RESNET_MINI / "deploy.prototxt", LAYERS)
    assert np.array_equal(ties["conv1"], ties["a2"]) and (ties["conv1"] >= 0).all()
    assert np.array_equal(ties["proj"], ties["b2"]) and (ties["proj"] >= 0).all()
    assert (ties["a1"] == -1).all() and (ties["b1"] == -1).all() and (ties["fc"] == -1).all()
    assert len(np.unique(np.concatenate([ties["conv1"], ties["proj"]]))) == 24


def test_one_draw_per_tied_class() -> None:
    """Drawn per layer, tied maps disagree; per class, never; the untied layers' draws are unchanged."""
    ties = tied_channels(RESNET_MINI / "deploy.prototxt", LAYERS)
    rng = np.random.default_rng(3)
    shapes = {"conv1": (8, 1, 3, 3), "a1": (8, 8, 3, 3), "a2": (8, 8, 3, 3)}
    dna = {name: LayerDNA(rng.uniform(0.3, 1, s), rng.uniform(0.2, 1, s[0])) for name, s in shapes.items()}
    parent = {name: np.ones(s, bool) for name, s in shapes.items()}
    env = Environment(synapse=Factor((0.6,)), cluster=Factor((0.5,)))
    sub = {name: ties[name] for name in shapes}
    split = tied = 0
    for seed in range(20):
        free = sample_offspring(dna, parent, env, 1, np.random.default_rng(seed))
        bound = sample_offspring(dna, parent, env, 1, np.random.default_rng(seed), ties=sub)
        split += not tied_consistent(free, sub)
        tied += not tied_consistent(bound, sub)
        assert np.array_equal(free["a1"], bound["a1"])
    assert split > 10 and tied == 0


def test_the_stress_removes_tied_classes_whole() -> None:
    """The stress anticipates the next offspring, so its draw is per tied class as synthesis's is."""
    from caffe_evo.caffe_env import load_caffe
    from caffe_evo.encoding import EncodingConfig
    from caffe_evo.stress import StressConfig, StressSignal

    caffe = load_caffe()
    caffe.set_random_seed(0)
    net = caffe.Net(str(RESNET_MINI / "deploy.prototxt"), caffe.TEST)
    ties = tied_channels(RESNET_MINI / "deploy.prototxt", LAYERS)
    masks = {name: np.ones(net.params[name][0].data.shape, bool) for name in LAYERS}
    env = Environment(synapse=Factor((0.9,)), cluster=Factor((0.5,)))
    split = {}
    for with_ties in (False, True):
        split[with_ties] = 0
        for seed in range(10):
            signal = StressSignal(
                StressConfig("cluster", (0.0,), 1),
                EncodingConfig(level="cluster"),
                env,
                1,
                masks,
                frozenset({"fc"}),
                np.random.default_rng(seed),
                ties if with_ties else {},
            )
            signal._net = net
            removed = signal._removal()
            split[with_ties] += not tied_consistent({n: masks[n] & ~removed[n] for n in LAYERS}, ties)
    assert split[False] > 5 and split[True] == 0


@pytest.mark.parametrize("encoding", ["weights", "bn_folded"])
def test_two_generations_stay_tied_and_compact_exactly(
    encoding: str, data_root: Path, tmp_path: Path
) -> None:
    config = EvolutionConfig(
        recipe=str(RESNET_MINI),
        data_root=str(data_root),
        generations=2,
        population=1,
        seed=2,
        ancestor_iters=50,
        iters_per_generation=20,
        cluster_factor="0.75",
        synapse_factor="0.8",
        max_accuracy_drop=1.0,
        bn_batches=5,
        measure=False,
    )
    config.encoding = type(config.encoding)(strength=encoding)
    history = start(config, tmp_path / "run", progress=False).run()
    ties = tied_channels(RESNET_MINI / "deploy.prototxt", LAYERS)
    assert history[-1]["clusters"] < history[0]["clusters"]
    for generation in (1, 2):
        gen_dir = lineage.generation_dir(tmp_path / "run", generation)
        masks = masking.load(gen_dir / lineage.MASKS_FILE)
        assert tied_consistent(masks, ties)
        assert history[generation]["batchnorm_reestimation"]["batches"] == 5
        out = tmp_path / f"compact{generation}"
        summary = compact(gen_dir / "deploy.prototxt", gen_dir / WEIGHTS_FILE, out, masks)
        small = read_params(out / "deploy.prototxt", out / WEIGHTS_FILE)
        kept = sum(int(np.count_nonzero(small[name][0])) for name in LAYERS)
        assert kept == history[generation]["synapses"]
        dead = sum(int((~masks[n].reshape(len(masks[n]), -1).any(axis=1)).sum()) for n in LAYERS)
        assert summary["removed"] == dead
