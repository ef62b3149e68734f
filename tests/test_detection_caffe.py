"""DetectNet recipes in real pycaffe: the mini detector trains on digit scenes (loss falls, pooled scores),
a 2-generation lineage completes and shrinks, compaction and ONNX export are exact for both recipes, and
the full 1248x384 DetectNet loads and runs forward."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from caffe_evo import dependency, masking
from caffe_evo.caffe_env import caffe_pb2, load_caffe
from caffe_evo.compare import write_comparison
from caffe_evo.deploy import onnx_export
from caffe_evo.deploy.compaction import compact
from caffe_evo.errors import CaffeEvoError
from caffe_evo.evolution import EvolutionConfig, start
from caffe_evo.lineage import read_json
from caffe_evo.recipe import Recipe, parse_prototxt
from caffe_evo.report import write_report
from caffe_evo.training import TrainOptions, train
from data_prep.digit_scenes import convert_digit_scenes
from tests.conftest import RECIPES
from tests.test_compaction import max_difference, random_masks, random_net, save_masked

MINI, FULL = RECIPES / "detectnet-mini", RECIPES / "detectnet"
HEADS = ("coverage", "bboxes")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """A data root holding a small digit-scenes set: 160 training, 20 validation and 20 test scenes."""
    root = tmp_path_factory.mktemp("detection-data")
    counts = {"train": 160, "val": 20, "test": 20}
    convert_digit_scenes(data_root / "mnist", data_root / "fashion-mnist", root / "digit-scenes", counts)
    return root


@pytest.fixture(scope="module")
def ancestor(scenes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("detection-runs") / "ancestor"
    train(Recipe.load(MINI, scenes), out, TrainOptions(max_iter=200, seed=1, progress=False))
    return out


def test_mini_detector_loss_falls_and_scores_pool_over_the_split(ancestor: Path) -> None:
    curve = np.loadtxt(ancestor / "loss.csv", delimiter=",", skiprows=1)
    assert curve[-3:, 1].mean() < 0.7 * curve[:3, 1].mean(), curve[:, 1]
    metrics = read_json(ancestor / "metrics.json")
    for split in ("val", "test"):
        # Every scene once: the ground truth is all the split's boxes, not a per-batch mean.
        info = read_json(Path(metrics["data_root"]) / "digit-scenes" / "info.json")
        assert metrics[f"{split}_ground_truth"] == info["boxes"][split]
        for key in ("precision", "recall", "mAP", "loss_bbox", "loss_coverage"):
            assert np.isfinite(metrics[f"{split}_{key}"])
    assert metrics["final_loss"] == pytest.approx(curve[-1, 1])


def test_two_generation_detection_lineage_shrinks(ancestor: Path, scenes: Path, tmp_path: Path) -> None:
    config = EvolutionConfig(
        recipe=str(MINI),
        data_root=str(scenes),
        ancestor=str(ancestor),
        generations=2,
        population=1,
        iters_per_generation=30,
        fitness_metric="val_mAP",
        max_accuracy_drop=1.0,
        measure=False,  # compaction of the detectors: the test below
    )
    history = start(config, tmp_path / "run", progress=False).run()
    assert [m["generation"] for m in history] == [0, 1, 2]
    synapses = [m["synapses"] for m in history]
    assert synapses[0] > synapses[1] > synapses[2]
    assert history[-1]["selection"]["metric"] == "val_mAP"
    assert all(np.isfinite(m["val_mAP"]) and np.isfinite(m["test_recall"]) for m in history)
    masks = masking.load(tmp_path / "run" / "gen_002" / "masks.npz")
    for head in ("cvg/classifier", "bbox/regressor"):  # both output heads keep every output
        assert masks[head].reshape(len(masks[head]), -1).any(axis=1).all()
    assert not masks["conv2"].reshape(32, -1).any(axis=1).all()  # while the trunk loses whole kernels
    report = write_report(tmp_path / "run")
    header = (report / "lineage.csv").read_text().splitlines()[0].split(",")
    assert {"val_mAP", "test_precision", "test_recall", "test_mAP"} <= set(header)
    assert "test mAP" in (report / "report.md").read_text() and (report / "precision_recall.png").is_file()
    compared = write_comparison([tmp_path / "run"], tmp_path / "compare")
    assert "test mAP" in (compared / "compare.md").read_text()


@pytest.mark.parametrize("recipe", [MINI, FULL], ids=["mini", "full"])
def test_compaction_and_onnx_export_are_exact(recipe: Path, tmp_path: Path) -> None:
    deploy = recipe / "deploy.prototxt"
    net, rng = random_net(deploy, 3)
    trunk = [name for name in net.params if name not in ("cvg/classifier", "bbox/regressor")]
    masks = random_masks(net, rng, {name: len(net.params[name][0].data) // 3 for name in trunk})
    weights = save_masked(net, masks, {}, tmp_path / "masked")
    summary = compact(deploy, weights, tmp_path / "compact", masks=masks)
    assert summary["params_after"] < summary["params_before"]
    shape = net.blobs["data"].data.shape
    feed = np.random.default_rng(1).uniform(0, 255, (1, *shape[1:])).astype(np.float32)
    assert max_difference((deploy, weights), tmp_path / "compact", feed, HEADS) <= 1e-4
    caffe = load_caffe()
    compacted = tmp_path / "compact"
    small = caffe.Net(str(compacted / "deploy.prototxt"), str(compacted / "weights.caffemodel"), caffe.TEST)
    proto = parse_prototxt(tmp_path / "compact" / "deploy.prototxt", caffe_pb2().NetParameter())
    session = onnxruntime.InferenceSession(onnx_export.convert(proto, small).SerializeToString())
    small.blobs["data"].data[...] = feed
    small.forward()
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"data": feed}), strict=False))
    for head in HEADS:
        want = small.blobs[head].data
        assert np.max(np.abs(got[head] - want)) <= 1e-4 * max(1.0, float(np.abs(want).max()))


def test_full_detectnet_loads_and_runs_forward() -> None:
    caffe = load_caffe()
    net = caffe.Net(str(FULL / "deploy.prototxt"), caffe.TEST)
    started = time.perf_counter()
    net.forward()
    print(f"DetectNet 1248x384 forward, random weights: {time.perf_counter() - started:.2f} s")
    assert net.blobs["coverage"].data.shape == (1, 1, 24, 78)
    assert net.blobs["bboxes"].data.shape == (1, 4, 24, 78)
    proto = parse_prototxt(FULL / "deploy.prototxt", caffe_pb2().NetParameter())
    assert dependency.output_layers(proto) == {"cvg/classifier", "bbox/regressor"}


def test_heads_off_the_ground_truth_stride_are_one_clear_error(scenes: Path, tmp_path: Path, data_root: Path):
    recipe = tmp_path / "recipe"
    shutil.copytree(MINI, recipe)
    stride_2 = '"pool3" pooling_param { pool: MAX kernel_size: 3 stride: 2 }'
    stride_1 = '"pool3" pooling_param { pool: MAX kernel_size: 3 stride: 1 pad: 1 }'
    for name in ("train_val.prototxt", "deploy.prototxt"):  # pool3 at stride 1: heads at stride 8
        (recipe / name).write_text((recipe / name).read_text().replace(stride_2, stride_1))
    with pytest.raises(CaffeEvoError, match=r"head 'coverage' is 16x16 for a 128x128 input, not stride 16"):
        train(Recipe.load(recipe, scenes), tmp_path / "out", TrainOptions(max_iter=1, progress=False))
    small = tmp_path / "data"
    counts = {"train": 2, "val": 2, "test": 2}
    convert_digit_scenes(data_root / "mnist", data_root / "fashion-mnist", small / "digit-scenes", counts, 64)
    with pytest.raises(CaffeEvoError, match=r"made at stride 16 for 64x64 images; .* stride 16 for 128x128"):
        train(Recipe.load(MINI, small), tmp_path / "out", TrainOptions(max_iter=1, progress=False))
    assert not (tmp_path / "out").exists()
