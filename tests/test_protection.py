"""Every output layer keeps every output after every mask-editing step (issue 11, defects 1, 2 and 8)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import RECIPES

from caffe_evo.baselines import magnitude_masks
from caffe_evo.caffe_env import caffe_pb2, load_caffe
from caffe_evo.dependency import drop_unread, output_layers
from caffe_evo.encoding import EncodingConfig, LayerDNA, bias_mask, encode
from caffe_evo.recipe import parse_prototxt
from caffe_evo.synthesis import Environment, Factor, sample_offspring

CHAIN = """
name: "chain"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 6 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1" inner_product_param { num_output: 8 } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" inner_product_param { num_output: 4 } }
layer { name: "prob" type: "Softmax" bottom: "ip2" top: "prob" }
"""


def _conv(name: str, bottom: str, top: str, outputs: int, kernel: int, extra: str = "") -> str:
    return (
        f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{top}" {extra}'
        f"convolution_param {{ num_output: {outputs} kernel_size: {kernel} }} }}\n"
    )


# Two heads, as DetectNet's coverage (through a Sigmoid) and bbox regressor; a Concat before them.
HEADS = (
    'name: "heads"\n'
    'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }\n'
    + _conv("a", "data", "a", 4, 3)
    + _conv("b", "data", "b", 4, 3)
    + 'layer { name: "cat" type: "Concat" bottom: "a" bottom: "b" top: "cat" }\n'
    'layer { name: "relu" type: "ReLU" bottom: "cat" top: "cat" }\n'
    + _conv("cvg", "cat", "cvg", 1, 1)
    + 'layer { name: "coverage" type: "Sigmoid" bottom: "cvg" top: "coverage" }\n'
    + _conv("bbox", "cat", "bboxes", 4, 1)
    + _conv("train_only", "cat", "extra", 2, 1, "include { phase: TRAIN } ")
)


def _proto(text: str, tmp_path: Path) -> tuple[Path, object]:
    path = tmp_path / "deploy.prototxt"
    path.write_text(text)
    return path, parse_prototxt(path, caffe_pb2().NetParameter())


def test_output_layers_are_found_through_the_graph(tmp_path: Path) -> None:
    lenet = parse_prototxt(RECIPES / "lenet5" / "deploy.prototxt", caffe_pb2().NetParameter())
    assert output_layers(lenet) == {"ip2"}
    assert output_layers(_proto(HEADS, tmp_path)[1]) == {"cvg", "bbox"}


def _chain(tmp_path: Path, seed: int) -> tuple[Path, dict[str, list[np.ndarray]], dict[str, np.ndarray]]:
    """A late-generation ip1 -> ip2 chain: few living ip1 neurons, ip2 rows with one or two synapses."""
    deploy, _ = _proto(CHAIN, tmp_path)
    rng = np.random.default_rng(seed)
    masks = {"ip1": rng.random((8, 6)) < 0.5, "ip2": rng.random((4, 8)) < 0.35}
    masks["ip2"][np.arange(4), rng.integers(0, 8, 4)] = True  # every output reads something
    params = {
        name: [rng.standard_normal(m.shape) * m, rng.standard_normal(len(m)) * bias_mask(m)]
        for name, m in masks.items()
    }
    return deploy, params, masks


def test_dependency_step_gives_an_output_back_a_synapse_on_a_living_channel(tmp_path: Path) -> None:
    deploy, params, parent = _chain(tmp_path, 0)
    parent["ip1"][:] = True
    parent["ip2"][0] = [True, True, True, False, False, False, False, False]
    params["ip2"][0][0, :3] = [3.0, 0.5, -2.0]
    offspring = {name: m.copy() for name, m in parent.items()}
    offspring["ip1"][0] = False  # ip1 neuron 0 dies: channel 0 of ip2's input is zero
    offspring["ip2"][0] = [True, False, False, False, False, False, False, False]  # reads only channel 0
    got = drop_unread(deploy, params, offspring, frozenset({"ip2"}), parent)
    # Channel 0 is dead; of the parent's synapses on living channels, |-2.0| is the strongest.
    assert got["ip2"][0].tolist() == [False, False, True, False, False, False, False, False]
    assert bias_mask(got["ip2"]).all()
    unprotected = drop_unread(deploy, params, offspring)
    assert not unprotected["ip2"][0].any()  # the step alone would take the output away


def test_no_draw_loses_an_output_after_synthesis_and_the_dependency_step(tmp_path: Path) -> None:
    protected = frozenset({"ip2"})
    environment = Environment(Factor((0.7,)), Factor((0.6,)))
    for seed in range(40):
        deploy, params, parent = _chain(tmp_path, seed)
        weights = {name: p[0] for name, p in params.items()}
        dna = encode(weights, parent, EncodingConfig(), protected)
        child = sample_offspring(dna, parent, environment, 5, np.random.default_rng(seed), protected)
        got = drop_unread(deploy, params, child, protected, parent)
        assert bias_mask(got["ip2"]).all(), f"draw {seed} lost an output"
        assert not (got["ip2"] & ~parent["ip2"]).any()  # only parent synapses come back


def test_magnitude_pruning_protects_outputs() -> None:
    weights = {"hidden": np.array([[0.01, 0.02], [1.0, 2.0]]), "fc": np.array([[0.01, 0.03], [5.0, 4.0]])}
    masks = {name: np.ones(w.shape, bool) for name, w in weights.items()}
    out = magnitude_masks(weights, masks, 0.5, "global", frozenset({"fc"}))
    assert out["fc"].tolist() == [[False, True], [True, True]]  # its strongest synapse, 0.03
    assert not out["hidden"][0].any()  # a hidden neuron may die
    assert not magnitude_masks(weights, masks, 0.5, "global")["fc"][0].any()


def _synapse_dna(rng: np.random.Generator) -> tuple[dict[str, LayerDNA], dict[str, np.ndarray]]:
    weights = {"conv": rng.standard_normal((4, 2, 3, 3)), "fc": rng.standard_normal((3, 16))}
    masks = {name: np.ones(w.shape, bool) for name, w in weights.items()}
    return encode(weights, masks, EncodingConfig(level="synapse")), masks


@pytest.mark.parametrize("scope", ["layer", "network"])
def test_size_exponent_without_cluster_level_layers(scope: str) -> None:
    rng = np.random.default_rng(1)
    factor = Factor((0.8,), scope=scope, size_exponent=1.0)
    assert factor.apply_layers({}, {}, 1) == {}
    environment = Environment(factor, factor)
    dna, masks = _synapse_dna(rng)  # --encoding synapse: no cluster draw anywhere
    child = sample_offspring(dna, masks, environment, 1, rng, frozenset({"fc"}))
    assert child["conv"].sum() < masks["conv"].sum()
    cluster_dna = encode(
        {"fc": rng.standard_normal((3, 16))}, {"fc": np.ones((3, 16), bool)}, EncodingConfig()
    )
    only_protected = sample_offspring(
        cluster_dna, {"fc": np.ones((3, 16), bool)}, environment, 1, rng, frozenset({"fc"})
    )
    assert bias_mask(only_protected["fc"]).all()  # --layers naming only the protected classifier


def test_stress_draws_keep_outputs_and_survive_a_size_exponent() -> None:
    from caffe_evo.stress import StressConfig, StressSignal

    caffe = load_caffe()
    net = caffe.Net(str(RECIPES / "lenet5" / "deploy.prototxt"), caffe.TEST)
    masks = {name: np.ones(net.params[name][0].data.shape, bool) for name in ("ip1", "ip2")}
    factor = Factor((0.05,), size_exponent=2.0)
    signal = StressSignal(
        StressConfig("synapse", (0.0,), 1),
        EncodingConfig(),
        Environment(factor, factor),
        1,
        masks,
        frozenset({"ip2"}),
        np.random.default_rng(0),
    )
    signal._net = net
    removed = signal._removal()  # the stress's draw: a synapse-level encoding, no cluster level
    assert (masks["ip2"] & ~removed["ip2"]).reshape(10, -1).any(axis=1).all()
