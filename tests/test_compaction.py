"""Compaction on real pycaffe: the compact net computes what the masked net computes, with fewer channels.

Every net here has random parameters and hand-placed dead clusters, so that each rule of the compaction
(removal, "nobody reads it", constant folding, Eltwise and group constraints, LRN) is exercised on purpose.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import RECIPES, no_partials

from caffe_evo import masking
from caffe_evo.caffe_env import load_caffe
from caffe_evo.dependency import drop_unread
from caffe_evo.deploy.compaction import compact
from caffe_evo.deploy.measure import cost, latency
from caffe_evo.errors import CaffeEvoError
from data_prep.lmdb_io import iter_datum_lmdb

FIXTURES = Path(__file__).parent / "fixtures"
LENET = RECIPES / "lenet5" / "deploy.prototxt"
TOLERANCE = 1e-5


def random_net(deploy: Path, seed: int) -> tuple[Any, np.random.Generator]:
    """A TEST net of ``deploy`` with random parameters that keep activations of order 1."""
    caffe = load_caffe()
    net = caffe.Net(str(deploy), caffe.TEST)
    rng = np.random.default_rng(seed)
    for name, blobs in net.params.items():
        data = [blob.data for blob in blobs]
        kind = net.layer_dict[name].type
        if kind in ("Convolution", "InnerProduct"):
            data[0][...] = rng.normal(0.0, np.sqrt(2.0 / data[0][0].size), data[0].shape)
            for bias in data[1:]:
                bias[...] = rng.normal(0.0, 0.1, bias.shape)
        elif kind == "BatchNorm":
            data[0][...] = rng.normal(0.0, 0.2, data[0].shape)
            data[1][...] = rng.uniform(0.5, 1.5, data[1].shape)
            data[2][...] = 1.0
        elif kind == "Scale":
            data[0][...] = rng.uniform(0.5, 1.5, data[0].shape)
            data[1][...] = rng.normal(0.0, 0.2, data[1].shape)
        else:  # PReLU slopes, Bias terms
            data[0][...] = rng.uniform(0.1, 0.3, data[0].shape)
    return net, rng


def random_masks(net: Any, rng: np.random.Generator, dead: dict[str, int]) -> dict[str, np.ndarray]:
    """Masks for every Convolution/InnerProduct layer: 30% of synapses die, and ``dead`` whole kernels."""
    masks = {}
    for name, blobs in net.params.items():
        if net.layer_dict[name].type in ("Convolution", "InnerProduct"):
            shape = blobs[0].data.shape
            masks[name] = rng.random(shape) < 0.7
            masks[name][rng.choice(shape[0], dead.get(name, 0), replace=False)] = False
    return masks


def dead_kernels(masks: dict[str, np.ndarray], name: str) -> np.ndarray:
    return np.flatnonzero(~masks[name].reshape(len(masks[name]), -1).any(axis=1))


def save_masked(
    net: Any, masks: dict[str, np.ndarray], biases: dict[str, dict[int, float]], folder: Path
) -> Path:
    """Apply ``masks`` as masked training does, give some dead neurons a bias (constants), save the net."""
    masking.apply(net, masking.from_weight_masks(masks, net))
    for name, values in biases.items():
        for neuron, value in values.items():
            assert not masks[name][neuron].any(), "a constant neuron must have no living synapse"
            net.params[name][1].data[neuron] = value
    folder.mkdir(parents=True, exist_ok=True)
    net.save(str(folder / "weights.caffemodel"))
    return folder / "weights.caffemodel"


def outputs(deploy: Path, weights: Path, feed: np.ndarray, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Blobs ``names`` of a plain ``caffe.Net`` after a forward pass of the batch ``feed``."""
    caffe = load_caffe()
    net = caffe.Net(str(deploy), str(weights), caffe.TEST)
    net.blobs["data"].reshape(*feed.shape)
    net.forward(data=feed.astype(np.float32))
    return {name: net.blobs[name].data.copy() for name in names}


def max_difference(full: tuple[Path, Path], small: Path, feed: np.ndarray, names: tuple[str, ...]) -> float:
    want = outputs(*full, feed, names)
    got = outputs(small / "deploy.prototxt", small / "weights.caffemodel", feed, names)
    differences = {name: float(np.max(np.abs(want[name] - got[name]))) for name in names}
    print("max abs difference:", ", ".join(f"{name} {value:.3g}" for name, value in differences.items()))
    return max(differences.values())


# -- LeNet-5 on real MNIST --


@pytest.fixture(scope="module")
def lenet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray], dict[str, Any]]:
    """Masked LeNet-5 (half its clusters dead, two dead ip1 neurons with a bias) and its compaction."""
    folder = tmp_path_factory.mktemp("lenet")
    net, rng = random_net(LENET, 1)
    masks = random_masks(net, rng, {"conv1": 10, "conv2": 25, "ip1": 250})
    folded, zeroed = dead_kernels(masks, "ip1")[:2]
    # 0.7 passes ReLU: a constant folded into ip2's bias; -0.4 is 0 after ReLU: nothing to fold.
    save_masked(net, masks, {"ip1": {folded: 0.7, zeroed: -0.4}}, folder / "full")
    shutil.copy(LENET, folder / "full" / "deploy.prototxt")
    summary = compact(
        folder / "full" / "deploy.prototxt", folder / "full" / "weights.caffemodel", folder / "compact"
    )
    return folder, masks, summary


def mnist_batch(data_root: Path, count: int) -> np.ndarray:
    images = [
        image for _, image, _ in itertools.islice(iter_datum_lmdb(data_root / "mnist" / "test_lmdb"), count)
    ]
    return np.stack(images).astype(np.float32) / 256


def test_lenet_compact_equals_masked_net_on_mnist(lenet: tuple, data_root: Path) -> None:
    folder, _, summary = lenet
    full = (folder / "full" / "deploy.prototxt", folder / "full" / "weights.caffemodel")
    assert max_difference(full, folder / "compact", mnist_batch(data_root, 64), ("prob", "ip2")) <= TOLERANCE
    kept = {name: layer["kept"] for name, layer in summary["layers"].items()}
    assert kept == {"conv1": 10, "conv2": 25, "ip1": 250, "ip2": 10}
    assert summary["layers"]["ip2"]["folded"] == 1  # the 0.7 neuron; the -0.4 one is 0 after ReLU
    assert summary["params_after"] < summary["params_before"] == 431080
    assert summary["max_abs_diff"] <= TOLERANCE and no_partials(folder)


def test_lenet_compact_runs_in_the_caffe_tool(lenet: tuple) -> None:
    folder = lenet[0] / "compact"
    tool = Path(sys.executable).parent / "caffe"
    args = ["time", "-model", folder / "deploy.prototxt", "-weights", folder / "weights.caffemodel"]
    result = subprocess.run(
        [tool, *map(str, args), "-iterations", "2"],
        capture_output=True,
        text=True,
        env=dict(os.environ, GLOG_minloglevel="2"),
    )
    assert result.returncode == 0, result.stderr


def test_masks_are_applied_like_masked_training(tmp_path: Path) -> None:
    """Given masks, unpruned weights are compacted to the net that masked training would use."""
    net, rng = random_net(LENET, 2)
    masks = random_masks(net, rng, {"conv1": 6, "conv2": 20, "ip1": 200})
    net.save(str(tmp_path / "raw.caffemodel"))
    summary = compact(LENET, tmp_path / "raw.caffemodel", tmp_path / "compact", masks=masks)
    masked = save_masked(net, masks, {}, tmp_path / "masked")
    feed = np.random.default_rng(0).random((8, 1, 28, 28))
    assert max_difference((LENET, masked), tmp_path / "compact", feed, ("prob", "ip2")) <= TOLERANCE
    assert [layer["kept"] for layer in summary["layers"].values()] == [14, 30, 300, 10]


def test_legacy_input_fields(lenet: tuple, tmp_path: Path) -> None:
    """A deploy net declaring its input with top-level `input:` fields instead of an Input layer."""
    text = LENET.read_text()
    input_layer = text[text.index("layer {") : text.index("layer {", text.index("layer {") + 1)]
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(
        text.replace(input_layer, 'input: "data"\ninput_shape { dim: 1 dim: 1 dim: 28 dim: 28 }\n')
    )
    weights = lenet[0] / "full" / "weights.caffemodel"
    summary = compact(deploy, weights, tmp_path / "compact")
    feed = np.random.default_rng(1).random((4, 1, 28, 28))
    assert max_difference((deploy, weights), tmp_path / "compact", feed, ("prob",)) <= TOLERANCE
    assert summary["kept"] == lenet[2]["kept"]


# -- AlexNet-, ResNet- and Inception-like shapes on random input --


def test_alexnet_shape(tmp_path: Path) -> None:
    """Strided padded conv, LRN across and within channels, grouped convs, pooled blocks into fc."""
    deploy = FIXTURES / "alexnet_small.prototxt"
    net, rng = random_net(deploy, 3)
    dead = {"conv1": 5, "conv2": 8, "conv4": 10, "conv5": 8, "fc6": 20, "fc7": 20}
    masks = random_masks(net, rng, dead)
    masks["conv3"][[0, 1, 2, 3, 4, 16, 17, 18, 19, 20]] = False  # five per group of conv4's inputs
    constants = {
        "conv3": {
            0: 0.2,
            16: 0.2,
        },  # conv4 pads, so it cannot fold these: they stay, and the groups stay equal
        "conv5": {
            dead_kernels(masks, "conv5")[0]: 0.3
        },  # through ReLU and max-pooling into a 4x4 block of fc6
        "fc6": {dead_kernels(masks, "fc6")[0]: 0.5},
    }
    weights = save_masked(net, masks, constants, tmp_path / "full")
    summary = compact(deploy, weights, tmp_path / "compact")
    feed = rng.standard_normal((4, 3, 67, 67))
    assert max_difference((deploy, weights), tmp_path / "compact", feed, ("prob", "fc8")) <= TOLERANCE
    layers = summary["layers"]
    assert layers["conv1"]["kept"] == 16 and any(note.startswith("norm1: LRN") for note in summary["notes"])
    assert all(layers[name]["kept"] % 2 == 0 for name in ("conv2", "conv4", "conv5"))  # equal groups
    assert layers["conv2"]["kept"] < 24  # conv2's zeros pass ReLU, LRN WITHIN_CHANNEL and pooling
    assert layers["conv3"]["kept"] == 32 - 8
    assert layers["fc6"]["folded"] == 1 and layers["fc7"]["folded"] == 1 and layers["fc8"]["kept"] == 10
    assert layers["fc6"]["kept"] == 64 - 20 and layers["fc7"]["kept"] == 64 - 20


def test_resnet_shape(tmp_path: Path) -> None:
    """BatchNorm/Scale constants, Eltwise ties between branches, bias-less convs gaining a folded bias."""
    deploy = FIXTURES / "resnet_small.prototxt"
    net, rng = random_net(deploy, 4)
    masks = random_masks(net, rng, {})
    # Residual channel 2: both producers dead, the padded readers blind; the 1x1 projection folds it.
    masks["conv1"][2] = masks["a2"][2] = masks["a1"][:, 2] = masks["b1"][:, 2] = False
    masks["a1"][3] = masks["a2"][:, 3] = False  # nobody reads a1's channel 3
    masks["a1"][6] = (
        False  # 0 after BatchNorm (mean 0), Scale (beta < 0) and ReLU: a padded reader may drop it
    )
    masks["proj"][5] = masks["b2"][5] = False  # a constant through PReLU and global pooling into fc
    masks["proj"][9] = False  # b2's channel 9 lives, so the Eltwise keeps proj's channel 9 too
    masks["b1"][11] = masks["b2"][:, 11] = False  # nobody reads b1's channel 11
    masks["fc"][:, 7] = False  # nobody reads addB's channel 7: proj and b2 lose their living neuron 7 ...
    masks["b2"][np.arange(16) != 7, 12] = (
        False  # ... and b1's channel 12, read by b2's neuron 7 only, goes too
    )
    # BatchNorm means 0 so that Scale's beta is the constant: addA's channel 2 is 0.5 + 0.3 after reluA,
    # addB's channel 5 is -0.4 + 0.5 * 0.2 before PReLU's slope.
    betas = (("conv1", 2, 0.5), ("a2", 2, 0.3), ("a1", 6, -0.5), ("proj", 5, -0.4), ("b2", 5, 0.2))
    for layer, channel, beta in betas:
        net.params[f"{layer}_bn"][0].data[channel] = 0.0
        net.params[f"{layer}_scale"][1].data[channel] = beta
    weights = save_masked(net, masks, {}, tmp_path / "full")
    summary = compact(deploy, weights, tmp_path / "compact")
    feed = rng.standard_normal((4, 3, 16, 16))
    assert max_difference((deploy, weights), tmp_path / "compact", feed, ("prob", "fc")) <= TOLERANCE
    removed = {name: layer["removed"] for name, layer in summary["layers"].items()}
    assert removed == {"conv1": 1, "a1": 2, "a2": 1, "b1": 2, "b2": 2, "proj": 2, "fc": 0}
    assert summary["layers"]["proj"]["folded"] == 1 and summary["layers"]["fc"]["folded"] == 1
    small = load_caffe().Net(str(tmp_path / "compact" / "deploy.prototxt"), load_caffe().TEST)
    assert len(small.params["proj"]) == 2  # the folded residual constant needs a bias
    assert small.params["reluB"][0].data.shape == (14,) and small.params["a1_bn"][0].data.shape == (6,)


def test_split_concat_flatten(tmp_path: Path) -> None:
    """Channel blocks through Concat and an explicit Flatten, constants through a Bias layer."""
    deploy = FIXTURES / "concat_small.prototxt"
    net, rng = random_net(deploy, 5)
    masks = random_masks(net, rng, {})
    masks["convA"][1] = masks["convB"][2] = False
    weights = save_masked(net, masks, {"convA": {1: 0.4}, "convB": {2: -0.2}}, tmp_path / "full")
    summary = compact(deploy, weights, tmp_path / "compact")
    feed = rng.standard_normal((4, 2, 8, 8))
    assert max_difference((deploy, weights), tmp_path / "compact", feed, ("prob", "fc")) <= TOLERANCE
    assert summary["layers"]["fc"]["folded"] == 2 and summary["kept"] == 3 + 3 + 10


# -- bad input --


@pytest.mark.parametrize("kind", ["Frobnicate", "TanH"])
def test_unsupported_layer_type(kind: str, lenet: tuple, tmp_path: Path) -> None:
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(LENET.read_text().replace('type: "ReLU"', f'type: "{kind}"'))
    weights = lenet[0] / "full" / "weights.caffemodel"
    with pytest.raises(
        CaffeEvoError, match=f"layer 'relu1' has type {kind} that compaction does not support"
    ):
        compact(deploy, weights, tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_partials(tmp_path)


def test_bad_input_is_one_line(lenet: tuple, tmp_path: Path) -> None:
    weights = lenet[0] / "full" / "weights.caffemodel"
    corrupt = tmp_path / "corrupt.caffemodel"
    corrupt.write_bytes(weights.read_bytes()[:5000])
    (tmp_path / "exists").mkdir()
    unbuildable = tmp_path / "tiny.prototxt"
    unbuildable.write_text(LENET.read_text().replace("dim: 28 dim: 28", "dim: 4 dim: 4"))
    duplicate = tmp_path / "duplicate.prototxt"
    duplicate.write_text(LENET.read_text().replace('name: "relu1"', 'name: "ip1"'))
    cases = [
        (LENET, corrupt, tmp_path / "out", "not a valid caffemodel"),
        (LENET, tmp_path / "missing.caffemodel", tmp_path / "out", "weights file not found"),
        (FIXTURES / "concat_small.prototxt", weights, tmp_path / "out", "does not match"),
        (unbuildable, weights, tmp_path / "out", "Caffe cannot build"),
        (duplicate, weights, tmp_path / "out", "layer name 'ip1' is used more than once"),
        (LENET, weights, tmp_path / "exists", "exists"),
    ]
    for deploy, model, out, message in cases:
        with pytest.raises(CaffeEvoError, match=message) as error:
            compact(deploy, model, out)
        assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists() and no_partials(tmp_path)


# -- cost and latency --


def test_cost_of_lenet(lenet: tuple) -> None:
    folder, masks, summary = lenet
    macs = {"conv1": 20 * 24 * 24 * 1 * 25, "conv2": 50 * 8 * 8 * 20 * 25, "ip1": 500 * 800, "ip2": 500 * 10}
    architecture = cost(LENET)
    assert {name: layer["macs"] for name, layer in architecture["layers"].items()} == macs
    assert architecture["macs"] == 2293000 and architecture["params"] == 431080
    assert architecture["synapses"] == 430500 and architecture["clusters"] == 580
    assert "file_bytes" not in architecture

    full = cost(folder / "full" / "deploy.prototxt", folder / "full" / "weights.caffemodel")
    assert full["macs"] == 2293000 and full["synapses"] == sum(int(mask.sum()) for mask in masks.values())
    assert full["clusters"] == 10 + 25 + 250 + 10
    assert full["file_bytes"] == (folder / "full" / "weights.caffemodel").stat().st_size

    small = cost(folder / "compact" / "deploy.prototxt", folder / "compact" / "weights.caffemodel")
    ip1 = summary["layers"]["ip1"]["kept"]
    expected = {
        "conv1": 10 * 24 * 24 * 25,
        "conv2": 25 * 8 * 8 * 10 * 25,
        "ip1": ip1 * 25 * 16,
        "ip2": 10 * ip1,
    }
    assert {name: layer["macs"] for name, layer in small["layers"].items()} == expected
    assert small["params"] == summary["params_after"] and small["clusters"] == full["clusters"]


def test_latency(lenet: tuple) -> None:
    folder = lenet[0] / "compact"
    timing = latency(folder / "deploy.prototxt", folder / "weights.caffemodel", batch=8, repeats=3, warmup=1)
    assert timing["batch"] == 8 and timing["median_ms"] > 0
    assert timing["images_per_s"] == pytest.approx(8 * 1000 / timing["median_ms"])
    with pytest.raises(CaffeEvoError, match="batch >= 1"):
        latency(folder / "deploy.prototxt", folder / "weights.caffemodel", batch=0)


# -- dropping the synapses that cannot change the output (the offspring's dependency step) --


def masked_outputs(
    deploy: Path, net: Any, masks: dict[str, np.ndarray], feed: np.ndarray, name: str
) -> np.ndarray:
    """Output ``name`` of ``net``'s parameters under ``masks`` (as masked training applies them)."""
    caffe = load_caffe()
    copy = caffe.Net(str(deploy), caffe.TEST)
    for layer, blobs in net.params.items():
        for target, blob in zip(copy.params[layer], blobs, strict=True):
            target.data[...] = blob.data
    masking.apply(copy, masking.from_weight_masks(masks, copy))
    copy.blobs["data"].reshape(*feed.shape)
    copy.forward(data=feed.astype(np.float32))
    return copy.blobs[name].data.copy()


def params_of(net: Any) -> dict[str, list[np.ndarray]]:
    return {name: [blob.data.copy() for blob in blobs] for name, blobs in net.params.items()}


def test_drop_unread_on_lenet_keeps_the_function_on_mnist(data_root: Path) -> None:
    net, rng = random_net(LENET, 7)
    masks = random_masks(net, rng, {"conv1": 8, "conv2": 20, "ip1": 200})
    # ip1 neuron 0 reads only conv2 maps that are dead: it dies too, and ip2 stops reading it.
    dead_maps = dead_kernels(masks, "conv2")
    masks["ip1"][0] = False
    masks["ip1"][0].reshape(50, 16)[dead_maps] = True
    got = drop_unread(LENET, params_of(net), masks)
    assert all(not (got[n] & ~masks[n]).any() for n in masks)  # only ever removes
    assert not got["conv2"][:, dead_kernels(masks, "conv1")].any()
    assert not got["ip1"].reshape(500, 50, 16)[:, dead_maps].any()
    assert not got["ip1"][0].any() and not got["ip2"][:, 0].any()
    assert not got["ip2"][:, dead_kernels(masks, "ip1")].any()
    removed = sum(int(masks[n].sum() - got[n].sum()) for n in masks)
    assert removed > 0.3 * sum(int(m.sum()) for m in masks.values())
    feed = mnist_batch(data_root, 16)
    np.testing.assert_array_equal(
        masked_outputs(LENET, net, got, feed, "ip2"), masked_outputs(LENET, net, masks, feed, "ip2")
    )
    again = drop_unread(LENET, params_of(net), got)
    assert all(np.array_equal(again[n], got[n]) for n in got)


def test_drop_unread_keeps_what_batchnorm_makes_non_zero() -> None:
    deploy = FIXTURES / "resnet_small.prototxt"
    net, rng = random_net(deploy, 5)
    masks = random_masks(net, rng, {})
    masks["b1"][4] = False  # b1 channel 4 is dead, but BatchNorm and Scale make it 0.5 after ReLU
    net.params["b1_bn"][0].data[4] = 0.0
    net.params["b1_scale"][1].data[4] = 0.5
    masks["a1"][3] = masks["a2"][:, 3] = False  # a1 channel 3: dead, and a2 reads nothing of it
    masks["b2"][:, 9] = False
    masks["b1"][9] = True  # b1 channel 9 lives, but no b2 synapse reads it: b1 loses neuron 9
    got = drop_unread(deploy, params_of(net), masks)
    assert got["b2"][:, 4].any() and np.array_equal(got["b2"][:, 4], masks["b2"][:, 4])
    assert not got["b1"][9].any()
    feed = rng.standard_normal((2, 3, 16, 16))
    want = masked_outputs(deploy, net, masks, feed, "fc")
    np.testing.assert_allclose(masked_outputs(deploy, net, got, feed, "fc"), want, rtol=0, atol=1e-6)


def test_drop_unread_refuses_layers_it_cannot_follow(tmp_path: Path) -> None:
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(LENET.read_text().replace('type: "ReLU"', 'type: "TanH"'))
    with pytest.raises(CaffeEvoError, match="type TanH that compaction does not support"):
        drop_unread(deploy, {}, {})
