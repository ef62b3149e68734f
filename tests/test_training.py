"""Training through pycaffe on real MNIST, and the driver's handling of bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import no_partials

from caffe_evo.caffe_env import load_caffe
from caffe_evo.errors import CaffeEvoError
from caffe_evo.recipe import Recipe
from caffe_evo.training import TrainOptions, train


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    out = tmp_path_factory.mktemp("train") / "lenet5"
    recipe = Recipe.load(Path(__file__).parent.parent / "prototxt" / "lenet5", data_root)
    train(recipe, out, TrainOptions(max_iter=120, seed=7, progress=False))
    return out


def test_short_training_lowers_the_loss(short_run: Path) -> None:
    lines = (short_run / "loss.csv").read_text().splitlines()[1:]
    losses = [float(line.split(",")[1]) for line in lines]
    assert losses[-1] < 0.6 * losses[0]
    metrics = json.loads((short_run / "metrics.json").read_text())
    assert metrics["iterations"] == 120 and metrics["seed"] == 7
    assert 0.7 < metrics["test_accuracy"] <= 1.0 and 0.7 < metrics["val_accuracy"] <= 1.0


def test_outputs_are_plain_caffe(short_run: Path) -> None:
    caffe = load_caffe()
    net = caffe.Net(str(short_run / "deploy.prototxt"), str(short_run / "weights.caffemodel"), caffe.TEST)
    assert np.abs(net.params["conv1"][0].data).sum() > 0
    solver = caffe.get_solver(str(short_run / "solver.prototxt"))
    solver.restore(str(short_run / "weights.solverstate"))
    assert solver.iter == 120
    assert np.array_equal(solver.net.params["ip2"][0].data, net.params["ip2"][0].data)
    assert no_partials(short_run.parent)


def test_same_seed_same_weights(short_run: Path, data_root: Path, tmp_path: Path) -> None:
    recipe = Recipe.load(Path(__file__).parent.parent / "prototxt" / "lenet5", data_root)
    again = tmp_path / "again"
    train(recipe, again, TrainOptions(max_iter=120, seed=7, progress=False))
    assert (again / "weights.caffemodel").read_bytes() == (short_run / "weights.caffemodel").read_bytes()


def test_existing_output_is_refused(short_run: Path, data_root: Path, lenet5: Path) -> None:
    with pytest.raises(CaffeEvoError, match="already exists"):
        train(Recipe.load(lenet5, data_root), short_run, TrainOptions(max_iter=1, progress=False))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "caffe_evo.cli", *args], capture_output=True, text=True)


def _train(recipe: Path, data_root: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    """`caffe-evo train` for one iteration, with extra options."""
    return _cli(
        "train",
        "--recipe",
        str(recipe),
        "--data-root",
        str(data_root),
        "--out",
        str(out),
        "--iters",
        "1",
        *options,
    )


def _assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("caffe-evo: ") and fragment in lines[0], lines


def test_corrupt_caffemodel(lenet5: Path, data_root: Path, tmp_path: Path, short_run: Path) -> None:
    bad = tmp_path / "bad.caffemodel"
    bad.write_bytes((short_run / "weights.caffemodel").read_bytes()[:5000])
    out = tmp_path / "out"
    result = _train(lenet5, data_root, out, "--weights", str(bad), "--no-progress")
    _assert_one_line_error(result, "not a valid caffemodel")
    assert not out.exists() and no_partials(tmp_path)


def test_weights_that_do_not_match(lenet5: Path, data_root: Path, tmp_path: Path, short_run: Path) -> None:
    wide = tmp_path / "wide"
    shutil.copytree(lenet5, wide)
    net = (wide / "train_val.prototxt").read_text().replace("num_output: 500", "num_output: 400")
    (wide / "train_val.prototxt").write_text(net)
    out = tmp_path / "out"
    result = _train(wide, data_root, out, "--weights", str(short_run / "weights.caffemodel"), "--no-progress")
    _assert_one_line_error(result, "layer 'ip1' blob 0 is (500, 800) in the weights, (400, 800) in the net")
    assert not out.exists() and no_partials(tmp_path)


def test_net_caffe_cannot_build(lenet5: Path, data_root: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(lenet5, broken)
    net = (broken / "train_val.prototxt").read_text().replace('bottom: "pool2"', 'bottom: "nowhere"')
    (broken / "train_val.prototxt").write_text(net)
    out = tmp_path / "out"
    result = _train(broken, data_root, out, "--no-progress")
    _assert_one_line_error(result, "Caffe cannot build the nets of recipe broken")
    assert "nowhere" in result.stderr
    assert not out.exists() and no_partials(tmp_path)


def test_nonsense_iterations(lenet5: Path, data_root: Path, tmp_path: Path) -> None:
    result = _cli(
        "train",
        "--recipe",
        str(lenet5),
        "--data-root",
        str(data_root),
        "--out",
        str(tmp_path / "o"),
        "--iters",
        "-5",
    )
    _assert_one_line_error(result, "--iters must be positive")


def test_caffe_log_only_with_verbose(lenet5: Path, data_root: Path, tmp_path: Path) -> None:
    quiet = _train(lenet5, data_root, tmp_path / "quiet", "--no-progress")
    loud = _train(lenet5, data_root, tmp_path / "loud", "--no-progress", "--verbose")
    assert quiet.returncode == 0 and loud.returncode == 0
    assert "Initializing solver" not in quiet.stderr
    assert "Initializing solver" in loud.stderr


def test_a_resolved_max_iter_below_one_is_refused(lenet5: Path, data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(CaffeEvoError, match="recipe lenet5: max_iter must be positive, got 0"):
        train(Recipe.load(lenet5, data_root), out, TrainOptions(solver_overrides={"max_iter": 0}))
    unset = tmp_path / "unset"  # Caffe's default max_iter is 0
    shutil.copytree(lenet5, unset)
    solver = unset / "solver.prototxt"
    solver.write_text("".join(line for line in solver.read_text().splitlines(True) if "max_iter" not in line))
    result = _cli("train", "--recipe", str(unset), "--data-root", str(data_root), "--out", str(out))
    _assert_one_line_error(result, "recipe unset: max_iter must be positive, got 0")
    assert not out.exists() and no_partials(tmp_path)


def test_the_progress_bar_is_closed_when_a_step_fails(lenet5: Path, data_root: Path, tmp_path: Path) -> None:
    from tqdm import tqdm

    from caffe_evo.training import run_solver

    solver = load_caffe().get_solver(str(Recipe.load(lenet5, data_root).write_resolved(tmp_path)))
    open_bars = len(tqdm._instances)
    with pytest.raises(KeyError) as failed:  # its traceback keeps the failed call's bar referenced
        run_solver(solver, 2, ["no_such_loss"], progress=True, description="fails")
    assert failed.value.args == ("no_such_loss",) and len(tqdm._instances) == open_bars
    del failed, solver  # now: a solver alive when the next test opens the same LMDBs would block it


def test_fp16_eval_seconds_time_the_test_nets_alone(data_root: Path, tmp_path: Path) -> None:
    """Between an fp16 run's two evaluations lie the restriction, a second BatchNorm re-estimation, a
    snapshot and the export; eval_seconds holds the evaluations only."""
    recipe = tmp_path / "bn_small"
    shutil.copytree(Path(__file__).parent / "fixtures" / "bn_small", recipe)
    solver = recipe / "solver.prototxt"
    solver.write_text(solver.read_text().replace("test_iter: 20", "test_iter: 1"))
    options = TrainOptions(max_iter=1, precision="fp16", bn_batches=40, progress=False)
    metrics = train(Recipe.load(recipe, data_root), tmp_path / "run", options)
    reestimation = metrics["batchnorm_reestimation"]
    assert reestimation["batches"] == 80
    # two evaluations of one batch of 100 images, against a second re-estimation of 40 batches of 64
    assert 0 < metrics["eval_seconds"] < reestimation["seconds"] / 4


def test_bn_batches_are_checked_alike_for_training_and_runs(
    lenet5: Path, data_root: Path, tmp_path: Path
) -> None:
    from caffe_evo.evolution import EvolutionConfig

    message = r"--bn-batches must be 0 \(off\) or more, got -1"
    with pytest.raises(CaffeEvoError, match=message):
        train(Recipe.load(lenet5, data_root), tmp_path / "out", TrainOptions(bn_batches=-1))
    with pytest.raises(CaffeEvoError, match=message):
        EvolutionConfig(recipe=str(lenet5), bn_batches=-1).validate()
    assert not (tmp_path / "out").exists()
