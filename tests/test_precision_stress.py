"""Synaptic precision restriction and stress-induced synthesis, on real pycaffe and MNIST."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from caffe_evo import lineage, masking, precision
from caffe_evo.caffe_env import add_solver_callback, load_caffe
from caffe_evo.encoding import EncodingConfig
from caffe_evo.errors import CaffeEvoError
from caffe_evo.evolution import EvolutionConfig, read_params, start
from caffe_evo.recipe import Recipe
from caffe_evo.stress import StressConfig, StressSignal
from caffe_evo.synthesis import Environment, Factor
from caffe_evo.training import TrainOptions, evaluate, train

ROOT = Path(__file__).resolve().parent.parent


def test_fp16_rounds_to_nearest_even() -> None:
    ulp = 2.0**-10  # spacing of fp16 just above 1.0
    values = np.array([1 + ulp / 2, 1 + 3 * ulp / 2, -(1 + ulp / 2), 2.0**-25, 65504.0], dtype=np.float32)
    expected = np.array([1.0, 1 + 2 * ulp, -1.0, 0.0, 65504.0], dtype=np.float32)
    assert np.array_equal(precision.FORMATS["fp16"](values), expected)


def test_bf16_rounds_to_nearest_even() -> None:
    ulp = 2.0**-7
    values = np.array([1 + ulp / 2, 1 + 3 * ulp / 2, 1 + ulp / 2 + 2.0**-20], dtype=np.float32)
    expected = np.array([1.0, 1 + 2 * ulp, 1 + ulp], dtype=np.float32)
    assert np.array_equal(precision.FORMATS["bf16"](values), expected)


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    out = tmp_path_factory.mktemp("fp16") / "run"
    recipe = Recipe.load(ROOT / "prototxt" / "lenet5", data_root)
    train(recipe, out, TrainOptions(max_iter=60, seed=5, precision="fp16", progress=False))
    return out


def test_stored_weights_are_fp16_and_evaluated_restricted(fp16_run: Path, data_root: Path) -> None:
    caffe = load_caffe()
    metrics = json.loads((fp16_run / "metrics.json").read_text())
    assert metrics["precision"] == "fp16" and metrics["restriction"]["overflow"] == 0
    assert {"test_accuracy_fp32", "val_accuracy_fp32"} <= metrics.keys()
    params = read_params(fp16_run / "deploy.prototxt", fp16_run / "weights.caffemodel")
    exported = np.load(fp16_run / "weights_fp16.npz")
    for name, blobs in params.items():
        for i, blob in enumerate(blobs):
            assert blob.dtype == np.float32
            assert np.array_equal(blob.astype(np.float16).astype(np.float32), blob)
            assert exported[f"{name}/{i}"].dtype == np.float16
            assert np.array_equal(exported[f"{name}/{i}"].astype(np.float32), blob)
    # Re-evaluating the stored (restricted) weights reproduces the reported test accuracy.
    test_net = caffe.Net(
        str(fp16_run / "train_val.prototxt"),
        caffe.TEST,
        stages=["test"],
        weights=str(fp16_run / "weights.caffemodel"),
    )
    assert evaluate(test_net, 100)["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-9)


def test_overflow_is_an_error_not_a_clip(fp16_run: Path) -> None:
    caffe = load_caffe()
    net = caffe.Net(str(fp16_run / "deploy.prototxt"), str(fp16_run / "weights.caffemodel"), caffe.TEST)
    net.params["ip1"][0].data[3, 4] = 1e6
    with pytest.raises(CaffeEvoError, match=r"fp16 restriction overflows layer 'ip1' blob 0: 1 values"):
        precision.restrict_net(net, "fp16")
    with pytest.raises(CaffeEvoError, match="unknown precision 'fp8'"):
        precision.restrict_net(net, "fp8")


class Observer:
    """Records the weights the forward pass used, and the weights the update starts from."""

    def __init__(self, net) -> None:
        self.net = net
        self.forward: list[np.ndarray] = []
        self.restored: list[np.ndarray] = []

    def on_start(self) -> None:
        self.forward.append(self.net.params["conv2"][0].data.copy())

    def on_gradients_ready(self) -> None:
        self.restored.append(self.net.params["conv2"][0].data.copy())


def _stress_signal(net, strength: float, period: int, level: str) -> StressSignal:
    masks = {name: np.ones(blobs[0].data.shape, bool) for name, blobs in net.params.items()}
    masks["conv2"][:, :, 0, 0] = False
    return StressSignal(
        StressConfig(level, (strength,), period),
        EncodingConfig(),
        Environment(Factor((0.7,)), Factor((0.8,))),
        generation=1,
        masks=masks,
        protected=frozenset({"ip2"}),
        rng=np.random.default_rng(0),
    )


@pytest.mark.parametrize("level", ["synapse", "cluster"])
def test_stress_hits_only_the_scheduled_iterations(data_root: Path, tmp_path: Path, level: str) -> None:
    caffe = load_caffe()
    recipe = Recipe.load(ROOT / "prototxt" / "lenet5", data_root)
    solver = caffe.get_solver(str(recipe.write_resolved(tmp_path, tmp_path)))
    signal = _stress_signal(solver.net, strength=0.25, period=3, level=level)
    masks = masking.from_weight_masks(signal.masks, solver.net)
    masking.apply(solver.net, masks)
    gradient_mask = masking.GradientMask(solver.net, masks).attach(solver)  # Caffe holds it weakly
    signal.attach(solver)
    observer = Observer(solver.net)
    add_solver_callback(solver, observer)
    solver.step(8)
    assert gradient_mask.seconds > 0
    assert [it for it, _ in signal.hits] == [0, 3, 6]
    pruned = ~signal.masks["conv2"]
    for it, (forward, restored) in enumerate(zip(observer.forward, observer.restored, strict=True)):
        assert np.all(forward[pruned] == 0.0) and np.all(restored[pruned] == 0.0)  # never revived
        stressed = forward != restored
        if it % 3:
            assert not stressed.any(), it
            continue
        assert stressed.any(), it
        assert np.allclose(forward[stressed], 0.25 * restored[stressed])
        if level == "cluster":  # whole output kernels are hit, never parts of one
            hit_rows = stressed.reshape(50, -1).any(axis=1)
            living = (restored != 0).reshape(50, -1)
            assert np.array_equal(stressed.reshape(50, -1)[hit_rows], living[hit_rows])


def test_stress_off_is_bit_identical_to_plain(data_root: Path, tmp_path: Path) -> None:
    recipe_dir = ROOT / "prototxt" / "lenet5"
    run_a, run_b = tmp_path / "plain", tmp_path / "off"
    common = {
        "recipe": str(recipe_dir),
        "data_root": str(data_root),
        "generations": 1,
        "ancestor_iters": 40,
        "iters_per_generation": 30,
        "max_accuracy_drop": 1.0,
    }
    start(EvolutionConfig.from_json(common), run_a, progress=False).run()
    off = {**common, "stress_level": "off", "stress_strength": "0.5", "stress_period": 2}
    start(EvolutionConfig.from_json(off), run_b, progress=False).run()
    for run in (run_a, run_b):
        assert lineage.generations(run)[1]["stress"] is None
    a = (lineage.generation_dir(run_a, 1) / "weights.caffemodel").read_bytes()
    assert a == (lineage.generation_dir(run_b, 1) / "weights.caffemodel").read_bytes()


def test_stressed_fp16_evolution(data_root: Path, tmp_path: Path) -> None:
    config = EvolutionConfig.from_json(
        {
            "recipe": str(ROOT / "prototxt" / "lenet5"),
            "data_root": str(data_root),
            "generations": 1,
            "ancestor_iters": 40,
            "iters_per_generation": 30,
            "max_accuracy_drop": 1.0,
            "precision": "fp16",
            "stress_level": "cluster",
            "stress_strength": "0.0",
            "stress_period": 5,
        }
    )
    history = start(config, tmp_path / "run", progress=False).run()
    gen1 = history[1]
    assert gen1["stress"]["stressed_iterations"] == 6 and gen1["stress"]["mean_synapses_stressed"] > 0
    assert gen1["precision"] == "fp16" and "test_accuracy_fp32" in gen1
    params = read_params(
        tmp_path / "run" / "gen_001" / "deploy.prototxt", tmp_path / "run" / "gen_001" / "weights.caffemodel"
    )
    for blobs in params.values():
        assert all(np.array_equal(b.astype(np.float16).astype(np.float32), b) for b in blobs)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"precision": "fp8"}, "unknown precision 'fp8'"),
        ({"stress_level": "extreme"}, "unknown stress level 'extreme'"),
        ({"stress_level": "synapse", "stress_strength": "1.5"}, "stress strength must be in [0, 1)"),
        ({"stress_level": "synapse", "stress_period": 0}, "stress period must be at least 1"),
    ],
)
def test_bad_precision_and_stress_options(changes: dict, message: str) -> None:
    with pytest.raises(CaffeEvoError, match=re.escape(message)):
        EvolutionConfig.from_json({"recipe": "prototxt/lenet5", **changes}).validate()
