"""BatchNorm through evolution: exact re-estimation, masked statistics of dead channels, fp16, stress."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from caffe_evo import batchnorm, masking, precision
from caffe_evo.caffe_env import caffe_pb2, load_caffe
from caffe_evo.deploy.compaction import compact
from caffe_evo.evolution import read_params
from caffe_evo.recipe import TRAIN_VAL_FILE, Recipe, parse_prototxt, to_prototxt
from caffe_evo.training import WEIGHTS_FILE, TrainOptions, evaluate, train

BN_SMALL = Path(__file__).parent / "fixtures" / "bn_small"


def batch_statistics_accuracy(folder: Path) -> float:
    """Validation accuracy of a trained folder when every BatchNorm normalises with its batch's statistics."""
    net_param = parse_prototxt(folder / TRAIN_VAL_FILE, caffe_pb2().NetParameter())
    for layer in net_param.layer:
        if layer.type == "BatchNorm":
            layer.batch_norm_param.use_global_stats = False
    path = folder / "batch_stats.prototxt"
    path.write_text(to_prototxt(net_param))
    caffe = load_caffe()
    net = caffe.Net(str(path), caffe.TEST, stages=["val"], weights=str(folder / WEIGHTS_FILE))
    return evaluate(net, 20)["accuracy"]


@pytest.fixture(scope="module")
def offspring(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An ancestor, then an offspring that lost 60% of conv2's synapses, fine-tuned briefly twice: with
    Caffe's moving averages only, and with re-estimated statistics (same seed, same training)."""
    tmp = tmp_path_factory.mktemp("bn")
    recipe = Recipe.load(BN_SMALL, data_root)
    train(recipe, tmp / "ancestor", TrainOptions(max_iter=300, progress=False, bn_batches=0))
    params = read_params(tmp / "ancestor" / "deploy.prototxt", tmp / "ancestor" / WEIGHTS_FILE)
    rng = np.random.default_rng(0)
    masks = {"conv1": np.ones(params["conv1"][0].shape, bool), "ip": np.ones(params["ip"][0].shape, bool)}
    masks["conv2"] = rng.random(params["conv2"][0].shape) < 0.4
    runs = {}
    for name, batches in (("moving", 0), ("reestimated", 50)):
        options = TrainOptions(
            max_iter=40, seed=7, init_params=params, weight_masks=masks, bn_batches=batches, progress=False
        )
        runs[name] = train(recipe, tmp / name, options)
    return {"tmp": tmp, "runs": runs, "masks": masks}


def test_reestimation_gives_the_batch_statistics_accuracy(offspring: dict[str, Any]) -> None:
    runs, tmp = offspring["runs"], offspring["tmp"]
    with_batch_stats = batch_statistics_accuracy(tmp / "moving")
    print({name: run["val_accuracy"] for name, run in runs.items()}, "batch statistics", with_batch_stats)
    assert with_batch_stats - runs["moving"]["val_accuracy"] > 0.05  # the inherited averages are far off
    assert abs(runs["reestimated"]["val_accuracy"] - with_batch_stats) <= 0.005
    step = runs["reestimated"]["batchnorm_reestimation"]
    assert step["layers"] == 2 and step["batches"] == 50 and step["images"] == 3200 and step["seconds"] > 0
    assert runs["moving"]["batchnorm_reestimation"] is None


def test_fp16_statistics_are_taken_from_the_rounded_network(
    offspring: dict[str, Any], data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under fp16 the statistics are re-estimated again after the weights are rounded, then rounded
    themselves: the second re-estimation sees fp16 weights, the stored statistics are fp16 values, and
    TEST-phase accuracy is what the rounded network does with batch statistics (within the 50-batch
    estimate's own spread: five successive estimates on this net span 96.1-97.65%)."""
    seen = []

    def spy(net: Any, batches: int) -> Any:
        w = net.params["conv2"][0].data
        seen.append(bool(np.array_equal(w, w.astype(np.float16).astype(np.float32))))
        return reestimate(net, batches)

    reestimate = batchnorm.reestimate
    monkeypatch.setattr(batchnorm, "reestimate", spy)
    tmp = offspring["tmp"]
    params = read_params(tmp / "ancestor" / "deploy.prototxt", tmp / "ancestor" / WEIGHTS_FILE)
    options = TrainOptions(
        max_iter=40, seed=7, init_params=params, weight_masks=offspring["masks"], bn_batches=50,
        precision="fp16", progress=False,
    )  # fmt: skip
    run = train(Recipe.load(BN_SMALL, data_root), tmp / "fp16", options)
    assert seen == [False, True]
    assert run["batchnorm_reestimation"]["batches"] == 100
    stored = read_params(tmp / "fp16" / "deploy.prototxt", tmp / "fp16" / WEIGHTS_FILE)
    for blob in stored["conv2_bn"][:2]:
        np.testing.assert_array_equal(blob, blob.astype(np.float16).astype(np.float32))
    assert abs(run["val_accuracy"] - batch_statistics_accuracy(tmp / "fp16")) <= 0.02


def test_reestimated_statistics_are_stored_and_compacted(offspring: dict[str, Any]) -> None:
    """The caffemodel holds the statistics themselves (factor 1); compaction keeps them."""
    folder = offspring["tmp"] / "reestimated"
    params = read_params(folder / "deploy.prototxt", folder / WEIGHTS_FILE)
    assert params["conv2_bn"][2][0] == 1.0
    masks = offspring["masks"]
    dead = np.zeros(8, bool)
    dead[[1, 5]] = True
    masks = {**masks, "conv1": masks["conv1"] & ~dead[:, None, None, None]}
    compact_dir = offspring["tmp"] / "compact"
    summary = compact(folder / "deploy.prototxt", folder / WEIGHTS_FILE, compact_dir, masks)
    assert summary["layers"]["conv1"]["kept"] == 6
    small = read_params(compact_dir / "deploy.prototxt", compact_dir / WEIGHTS_FILE)
    np.testing.assert_array_equal(small["conv2_bn"][0], params["conv2_bn"][0])
    np.testing.assert_array_equal(small["conv1_bn"][1], params["conv1_bn"][1][~dead])


def test_dead_channels_statistics_and_scale_stay_zero(data_root: Path, tmp_path: Path) -> None:
    """A dead map's BatchNorm statistics and Scale parameters are masked through training, so the map is
    0 after them and compaction removes it even before a padded reader."""
    recipe = Recipe.load(BN_SMALL, data_root)
    caffe = load_caffe()
    net = caffe.Net(str(BN_SMALL / "deploy.prototxt"), caffe.TEST)
    masks = {name: np.ones(net.params[name][0].data.shape, bool) for name in ("conv1", "conv2", "ip")}
    masks["conv1"][[0, 3]] = False
    masks["conv2"][[2]] = False
    init = {"conv1_scale": [np.full(8, 1.5, np.float32), np.full(8, 0.7, np.float32)]}
    options = TrainOptions(max_iter=20, weight_masks=masks, init_params=init, progress=False, bn_batches=5)
    train(recipe, tmp_path / "run", options)
    params = read_params(tmp_path / "run" / "deploy.prototxt", tmp_path / "run" / WEIGHTS_FILE)
    for layer, dead in (("conv1", [0, 3]), ("conv2", [2])):
        mean, variance = params[f"{layer}_bn"][:2]
        gamma, beta = params[f"{layer}_scale"]
        assert not mean[dead].any() and not variance[dead].any()
        assert not gamma[dead].any() and not beta[dead].any()
        assert np.all(gamma[np.setdiff1d(np.arange(len(gamma)), dead)] != 0)
    run = tmp_path / "run"
    summary = compact(run / "deploy.prototxt", run / WEIGHTS_FILE, tmp_path / "compact", masks)
    assert summary["layers"]["conv1"]["removed"] == 2 and summary["layers"]["conv2"]["removed"] == 1


def test_fp16_restricts_the_statistic_not_the_stored_sum() -> None:
    """Caffe's stored sums are the statistics times the factor: a variance of 100 with factor 999 would be
    99,900 as stored, beyond fp16's 65,504."""
    caffe = load_caffe()
    net = caffe.Net(str(BN_SMALL / "deploy.prototxt"), caffe.TEST)
    rng = np.random.default_rng(1)
    mean, variance = rng.normal(0, 3, 16), rng.uniform(50, 120, 16)
    blobs = net.params["conv2_bn"]
    blobs[0].data[...], blobs[1].data[...], blobs[2].data[...] = mean * 999.0, variance * 999.0, 999.0
    for blob in net.params["conv1_bn"]:
        blob.data[...] = 1.0
    report = precision.restrict_net(net, "fp16")
    assert report.overflow == 0
    got_mean, got_variance = batchnorm.statistics(net.params["conv2_bn"])
    np.testing.assert_allclose(got_variance, variance, rtol=1e-3)
    np.testing.assert_allclose(got_mean, mean, rtol=1e-3, atol=1e-3)
    assert net.params["conv2_bn"][2].data[0] == 1.0
    assert np.array_equal(blobs[1].data, blobs[1].data.astype(np.float16).astype(np.float32))


def test_follower_masks_follow_batchnorm_and_scale_only() -> None:
    proto = parse_prototxt(BN_SMALL / "deploy.prototxt", caffe_pb2().NetParameter())
    chains = masking.followers(proto)
    assert chains["conv1"] == [("conv1_bn", "BatchNorm"), ("conv1_scale", "Scale")]
    assert chains["ip"] == []
