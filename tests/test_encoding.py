"""The genetic encoding against probabilities worked out by hand on two tiny layers."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from caffe_evo.encoding import (
    EncodingConfig,
    bias_mask,
    cluster_probabilities,
    cluster_strengths,
    encode,
    expand_clusters,
    living_clusters,
    synapse_probabilities,
)
from caffe_evo.errors import CaffeEvoError

# Convolution (out=2, in=2, kh=1, kw=2); the -8 is dead, so it must not count anywhere.
CONV_W = np.array([1.0, -2.0, 0.0, 4.0, -1.0, 0.5, 2.0, -8.0]).reshape(2, 2, 1, 2)
CONV_MASK = np.arange(8).reshape(2, 2, 1, 2) != 7
# InnerProduct (out=3, in=2): neuron 1 lives with zero weights; the -5 is dead.
IP_W = np.array([[0.5, -1.0], [0.0, 0.0], [2.0, -5.0]])
IP_MASK = np.array([[True, True], [True, True], [True, False]])
LAYERS = {"conv": (CONV_W, CONV_MASK), "ip": (IP_W, IP_MASK)}


def shifted(x: float) -> float:
    return min(1.0, math.exp(x - 1))


def minus_one(x: float) -> float:
    return min(1.0, math.exp(x) - 1)


READINGS = [("exp_shifted", shifted), ("exp_minus_one", minus_one)]

# Living |w| in C order (the dead synapse last, probability 0) and the per-layer normaliser Z.
LIVING_ABS = {"conv": [1, 2, 0, 4, 1, 0.5, 2], "ip": [0.5, 1, 0, 0, 2]}
Z = {
    ("conv", "max"): 4.0,
    ("conv", "rms"): math.sqrt((1 + 4 + 0 + 16 + 1 + 0.25 + 4) / 7),
    ("ip", "max"): 2.0,
    ("ip", "rms"): math.sqrt((0.25 + 1 + 0 + 0 + 4) / 5),
}

# Cluster strengths by (layer, granularity, aggregate); None marks a dead cluster.
STRENGTHS = {
    ("conv", "kernel", "sum"): [7, 3.5],
    ("conv", "kernel", "l2"): [math.sqrt(21), math.sqrt(5.25)],
    ("conv", "kernel", "mean"): [7 / 4, 3.5 / 3],
    ("conv", "channel", "sum"): [[3, 4], [1.5, 2]],
    ("conv", "channel", "l2"): [[math.sqrt(5), 4], [math.sqrt(1.25), 2]],
    ("conv", "channel", "mean"): [[1.5, 2], [0.75, 2]],
    ("ip", "kernel", "sum"): [1.5, 0, 2],
    ("ip", "kernel", "l2"): [math.sqrt(1.25), 0, 2],
    ("ip", "kernel", "mean"): [0.75, 0, 2],
    **{("ip", "channel", agg): [[0.5, 1], [0, 0], [2, None]] for agg in ("sum", "l2", "mean")},
}


@pytest.mark.parametrize("reading, read", READINGS)
@pytest.mark.parametrize("normaliser", ["max", "rms"])
@pytest.mark.parametrize("layer", ["conv", "ip"])
def test_synapse_probabilities_by_hand(reading: str, read, normaliser: str, layer: str) -> None:
    weights, mask = LAYERS[layer]
    z = Z[layer, normaliser]
    expected = [read(a / z) for a in LIVING_ABS[layer]] + [0.0]
    got = synapse_probabilities(weights, mask, EncodingConfig(reading=reading, normaliser=normaliser))
    assert got.dtype == np.float64 and got.shape == weights.shape
    np.testing.assert_allclose(got.ravel(), expected, rtol=1e-12)


def test_synapse_probabilities_literal_values() -> None:
    got = synapse_probabilities(IP_W, IP_MASK, EncodingConfig())
    e = math.exp
    np.testing.assert_allclose(got, [[e(0.25 - 1), e(0.5 - 1)], [e(-1), e(-1)], [1.0, 0.0]], rtol=1e-12)


@pytest.mark.parametrize("key", sorted(STRENGTHS))
def test_cluster_strengths_by_hand(key: tuple[str, str, str]) -> None:
    layer, granularity, aggregate = key
    weights, mask = LAYERS[layer]
    expected = np.array(STRENGTHS[key], dtype=float)
    got = cluster_strengths(weights, mask, EncodingConfig(granularity=granularity, aggregate=aggregate))
    np.testing.assert_allclose(got, np.nan_to_num(expected, nan=0.0), rtol=1e-12)


@pytest.mark.parametrize("reading, read", READINGS)
@pytest.mark.parametrize("key", sorted(STRENGTHS))
def test_cluster_probabilities_by_hand(reading: str, read, key: tuple[str, str, str]) -> None:
    layer, granularity, aggregate = key
    weights, mask = LAYERS[layer]
    strengths = np.array(STRENGTHS[key], dtype=float)
    z = np.nanmax(strengths)
    expected = np.array([0.0 if math.isnan(s) else read(s / z) for s in strengths.ravel()])
    config = EncodingConfig(reading=reading, granularity=granularity, aggregate=aggregate)
    got = cluster_probabilities(weights, mask, config)
    np.testing.assert_allclose(got.ravel(), expected, rtol=1e-12)


def test_cluster_probabilities_literal_values() -> None:
    got = cluster_probabilities(CONV_W, CONV_MASK, EncodingConfig())
    np.testing.assert_allclose(got, [1.0, math.exp(3.5 / 7 - 1)], rtol=1e-12)


def test_dead_synapses_and_clusters_have_probability_zero() -> None:
    mask = CONV_MASK.copy()
    mask[1] = False
    mask[0, 0, 0, 1] = False
    config = EncodingConfig(reading="exp_minus_one")
    synapse = synapse_probabilities(CONV_W, mask, config)
    assert not synapse[~mask].any()
    assert synapse[0, 0, 0, 0] == pytest.approx(math.exp(1 / 4) - 1) and synapse[0, 1, 0, 1] == 1.0
    for granularity in ("kernel", "channel"):
        cluster = cluster_probabilities(CONV_W, mask, EncodingConfig(granularity=granularity))
        assert not cluster[1].any() and cluster[0].all()


@pytest.mark.parametrize(
    "config", [EncodingConfig(), EncodingConfig("cluster", "exp_minus_one", "rms", "l2")]
)
def test_all_zero_and_all_dead_layers_give_zero_without_warnings(config: EncodingConfig) -> None:
    zeros = np.zeros((3, 2, 1, 1))
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        for mask in (np.ones(zeros.shape, bool), np.zeros(zeros.shape, bool)):
            assert not synapse_probabilities(zeros, mask, config).any()
            assert not cluster_probabilities(zeros, mask, config).any()
        dead = np.zeros(CONV_W.shape, bool)
        assert not synapse_probabilities(CONV_W, dead, config).any()
        assert not cluster_probabilities(CONV_W, dead, config).any()


def test_living_clusters_expand_and_bias_mask() -> None:
    mask = CONV_MASK.copy()
    mask[1, 0] = False
    assert living_clusters(mask, "kernel").tolist() == [True, True]
    assert living_clusters(mask, "channel").tolist() == [[True, True], [False, True]]
    assert living_clusters(IP_MASK, "channel") is not IP_MASK
    np.testing.assert_array_equal(living_clusters(IP_MASK, "channel"), IP_MASK)
    values = np.array([[1.0, 2.0], [3.0, 4.0]])
    expanded = expand_clusters(values, CONV_W.shape, "channel")
    assert expanded.shape == CONV_W.shape and expanded[1, 0].tolist() == [[3.0, 3.0]]
    assert expand_clusters(np.array([5.0, 6.0]), CONV_W.shape, "kernel")[1].min() == 6.0
    with pytest.raises(CaffeEvoError, match=r"channel clusters .* need shape \(2, 2\)"):
        expand_clusters(np.ones(2), CONV_W.shape, "channel")
    with pytest.raises(CaffeEvoError, match="granularity 'row' is not one of: kernel, channel"):
        living_clusters(IP_MASK, "row")
    dead_neuron = CONV_MASK.copy()
    dead_neuron[1] = False
    assert bias_mask(dead_neuron).tolist() == [True, False]
    assert bias_mask(np.array([[False, False], [False, True]])).tolist() == [False, True]


def test_encode_follows_dict_order_and_levels() -> None:
    weights = {"ip": IP_W, "conv": CONV_W}
    masks = {"conv": CONV_MASK, "ip": IP_MASK}
    dna = encode(weights, masks, EncodingConfig(level="synapse"))
    assert list(dna) == ["ip", "conv"] and all(layer.cluster is None for layer in dna.values())
    dna = encode(weights, masks, EncodingConfig(granularity="channel"))
    assert dna["conv"].cluster.shape == (2, 2) and dna["ip"].cluster.shape == (3, 2)
    np.testing.assert_array_equal(
        dna["conv"].synapse, synapse_probabilities(CONV_W, CONV_MASK, EncodingConfig())
    )


@pytest.mark.parametrize("granularity", ["kernel", "channel"])
def test_protected_layer_clusters_have_probability_one(granularity: str) -> None:
    masks = {"conv": CONV_MASK, "ip": IP_MASK}
    dna = encode(
        {"conv": CONV_W, "ip": IP_W}, masks, EncodingConfig(granularity=granularity), frozenset({"ip"})
    )
    np.testing.assert_array_equal(dna["ip"].cluster, living_clusters(IP_MASK, granularity).astype(float))
    assert dna["conv"].cluster.min() < 1.0


def test_encode_rejects_mismatched_input() -> None:
    config = EncodingConfig()
    with pytest.raises(CaffeEvoError, match="no mask for layers: conv"):
        encode({"conv": CONV_W}, {"ip": IP_MASK}, config)
    with pytest.raises(CaffeEvoError, match=r"layer 'conv': mask shape \(3, 2\)"):
        encode({"conv": CONV_W}, {"conv": IP_MASK}, config)
    with pytest.raises(CaffeEvoError, match="layer 'ip': mask must be bool"):
        encode({"ip": IP_W}, {"ip": IP_MASK.astype(np.uint8)}, config)


@pytest.mark.parametrize("option", ["level", "reading", "normaliser", "aggregate", "granularity"])
def test_config_names_the_bad_option(option: str) -> None:
    with pytest.raises(CaffeEvoError, match=rf"^encoding {option} 'bogus' is not one of: \w+, \w+"):
        EncodingConfig(**{option: "bogus"})
