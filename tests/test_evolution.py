"""The evolution engine on real pycaffe and real MNIST: masked training, lineage, resume, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from caffe_evo import lineage, masking
from caffe_evo.caffe_env import caffe_pb2, load_caffe
from caffe_evo.encoding import EncodingConfig, encode
from caffe_evo.errors import CaffeEvoError, SelectionExhausted
from caffe_evo.evolution import Evolution, EvolutionConfig, read_params, resume, start
from caffe_evo.recipe import Recipe
from caffe_evo.synthesis import Environment, Factor, sample_offspring
from caffe_evo.training import TrainOptions, train


@pytest.fixture(scope="module")
def small_recipe(tmp_path_factory: pytest.TempPathFactory, lenet5_dir: Path) -> Path:
    """LeNet-5 evaluated on 1,000 validation and 1,000 test images, to keep runs short."""
    folder = tmp_path_factory.mktemp("recipes") / "lenet5-small"
    shutil.copytree(lenet5_dir, folder)
    solver = (folder / "solver.prototxt").read_text()
    solver = solver.replace("test_iter: 50", "test_iter: 10").replace("test_iter: 100", "test_iter: 10")
    (folder / "solver.prototxt").write_text(solver)
    return folder


@pytest.fixture(scope="module")
def lenet5_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "prototxt" / "lenet5"


def small_config(recipe: Path, data_root: Path, **changes) -> EvolutionConfig:
    values = {
        "recipe": str(recipe),
        "data_root": str(data_root),
        "generations": 2,
        "seed": 3,
        "ancestor_iters": 100,
        "iters_per_generation": 40,
        "max_accuracy_drop": 1.0,
        "population": 2,
        **changes,
    }
    return EvolutionConfig.from_json(values)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, small_recipe: Path, data_root: Path) -> Path:
    run = tmp_path_factory.mktemp("evo") / "run"
    start(small_config(small_recipe, data_root), run, progress=False).run()
    return run


def random_masks(net, rng: np.random.Generator, keep: float) -> dict[str, np.ndarray]:
    return {name: rng.random(blobs[0].data.shape) < keep for name, blobs in net.params.items()}


def test_pruned_weights_stay_zero_after_every_iteration(
    small_recipe: Path, data_root: Path, tmp_path
) -> None:
    caffe = load_caffe()
    recipe = Recipe.load(small_recipe, data_root)
    solver = caffe.get_solver(str(recipe.write_resolved(tmp_path, tmp_path)))
    weight_masks = random_masks(solver.net, np.random.default_rng(0), keep=0.5)
    weight_masks["ip1"][7] = False  # a whole dead neuron: its bias must die too
    masks = masking.from_weight_masks(weight_masks, solver.net)
    masking.apply(solver.net, masks)
    gradient_mask = masking.GradientMask(solver.net, masks).attach(solver)  # Caffe holds it weakly
    before = solver.net.params["conv2"][0].data.copy()
    for _ in range(15):
        solver.step(1)
        assert masking.violations(solver.net, masks) == 0
    assert gradient_mask.seconds > 0  # the callback did run
    assert solver.net.params["ip1"][1].data[7] == 0.0
    after = solver.net.params["conv2"][0].data
    assert np.any(after[weight_masks["conv2"]] != before[weight_masks["conv2"]])  # the living ones learn
    solver.snapshot()
    state = caffe_pb2().SolverState()
    state.ParseFromString(next(tmp_path.glob("*.solverstate")).read_bytes())
    # The momentum history holds one blob per learnable blob, in net order.
    flat_masks = [m for name in solver.net.params for m in masks[name]]
    for history, mask in zip(state.history, flat_masks, strict=True):
        assert np.all(np.array(history.data).reshape(mask.shape)[mask == 0] == 0.0)


def test_cluster_death_removes_the_bias(small_recipe: Path, data_root: Path, tmp_path: Path) -> None:
    recipe = Recipe.load(small_recipe, data_root)
    out = tmp_path / "trained"
    train(recipe, out, TrainOptions(max_iter=30, progress=False))
    params = read_params(out / "deploy.prototxt", out / "weights.caffemodel")
    weights = {name: blobs[0] for name, blobs in params.items()}
    masks = {name: np.ones(w.shape, bool) for name, w in weights.items()}
    dna = encode(weights, masks, EncodingConfig(level="cluster"), frozenset({"ip2"}))
    env = Environment(Factor((0.9,)), Factor((0.5,)))
    offspring = sample_offspring(dna, masks, env, 1, np.random.default_rng(1), frozenset({"ip2"}))
    dead_maps = ~offspring["conv2"].reshape(50, -1).any(axis=1)
    assert 5 < dead_maps.sum() < 45
    child = tmp_path / "child"
    train(
        recipe, child, TrainOptions(max_iter=20, init_params=params, weight_masks=offspring, progress=False)
    )
    trained = read_params(child / "deploy.prototxt", child / "weights.caffemodel")
    assert np.all(trained["conv2"][0][dead_maps] == 0.0)
    assert np.all(trained["conv2"][1][dead_maps] == 0.0)
    assert np.all(trained["conv2"][1][~dead_maps] != 0.0)
    assert np.all(trained["ip2"][0].reshape(10, -1).any(axis=1))  # the classifier keeps every output


def test_two_generations_shrink_with_heredity(uninterrupted: Path) -> None:
    history = lineage.generations(uninterrupted)
    assert [m["generation"] for m in history] == [0, 1, 2]
    synapses = [m["synapses"] for m in history]
    assert synapses[0] == 430500 and synapses[0] > synapses[1] > synapses[2]
    assert history[2]["synaptic_efficiency"] == pytest.approx(430500 / synapses[2])
    assert history[2]["cluster_efficiency"] > 1.0
    parent = masking.load(uninterrupted / "gen_001" / "masks.npz")
    child = masking.load(uninterrupted / "gen_002" / "masks.npz")
    params = read_params(
        uninterrupted / "gen_002" / "deploy.prototxt", uninterrupted / "gen_002" / "weights.caffemodel"
    )
    for name in parent:
        assert not np.any(child[name] & ~parent[name])  # a dead synapse never comes back
        assert np.all(params[name][0][~child[name]] == 0.0)
    # The dependency step: no synapse reads a dead map or neuron of the layer before it.
    dead = {name: ~child[name].reshape(len(child[name]), -1).any(axis=1) for name in child}
    assert dead["conv1"].any() and dead["ip1"].any()
    assert not child["conv2"][:, dead["conv1"]].any()
    assert not child["ip1"].reshape(500, 50, 16)[:, dead["conv2"]].any()
    assert not child["ip2"][:, dead["ip1"]].any()
    offspring = history[1]["environment"]
    assert offspring["scope"] == "layer" and offspring["layers"] == {} and offspring["size_exponent"] == 0.0
    for gen in history[1:]:  # natural selection kept the fitter of the two offspring
        seen = gen["selection"]["candidates"]
        assert len(seen) == 2 and gen["val_accuracy"] == max(c["val_accuracy"] for c in seen)
    run = json.loads((uninterrupted / "run.json").read_text())
    assert run["config"]["seed"] == 3 and run["versions"]["caffe"] == "1.0.0-rc3"
    assert "gen" in lineage.table(uninterrupted)


def _same_lineage(a: Path, b: Path) -> None:
    for gen in range(3):
        da, db = lineage.generation_dir(a, gen), lineage.generation_dir(b, gen)
        assert (da / "weights.caffemodel").read_bytes() == (db / "weights.caffemodel").read_bytes(), gen
        ma, mb = masking.load(da / "masks.npz"), masking.load(db / "masks.npz")
        assert all(np.array_equal(ma[name], mb[name]) for name in ma), gen
        ja, jb = (json.loads((d / "metrics.json").read_text()) for d in (da, db))
        assert (ja["val_accuracy"], ja["test_accuracy"]) == (jb["val_accuracy"], jb["test_accuracy"])


def test_resume_after_kill_equals_uninterrupted(
    uninterrupted: Path, small_recipe: Path, data_root: Path, tmp_path
):
    run = tmp_path / "run"
    config = tmp_path / "config.json"
    config.write_text(json.dumps(small_config(small_recipe, data_root).to_json()))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "caffe_evo.cli",
            "evolve",
            "--config",
            str(config),
            "--out",
            str(run),
            "--no-progress",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600  # generous: the machine may be busy
    while not list((run / "candidates" / "gen_002").glob(".a0_c0.partial-*")):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.5)  # inside generation 2's training
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "gen_002").exists()
    resume(run, progress=False).run()
    _same_lineage(uninterrupted, run)
    assert not list(run.rglob("*.partial-*"))


def test_floor_stops_the_run_and_keeps_the_lineage(
    small_recipe: Path, data_root: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    config = small_config(
        small_recipe,
        data_root,
        accuracy_floor=0.9999,
        max_attempts=2,
        generations=1,
        population=1,
        layer_factors={"conv1": {"cluster": "0.5"}},
    )
    with pytest.raises(SelectionExhausted, match=r"generation 1: no offspring reached .* in 2 attempts"):
        start(config, run, progress=False).run()
    assert (run / "gen_000" / "weights.caffemodel").is_file() and not (run / "gen_001").exists()
    assert sorted(p.name for p in (run / "candidates" / "gen_001").iterdir()) == ["a0_c0", "a1_c0"]
    tried = run / "candidates" / "gen_001" / "a0_c0"
    assert lineage.read_json(tried / "metrics.json")["environment"]["layers"] == {"conv1": {"cluster": 0.5}}
    conv1 = masking.load(tried / "masks.npz")["conv1"]
    assert conv1.reshape(20, -1).any(axis=1).sum() < 16  # its own factor: half the maps expected to die


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "caffe_evo.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--synapse-factor", "1.5"], "factor must be in (0, 1]"),
        (["--cluster-factor", "0"], "factor must be in (0, 1]"),
        (["--generations", "0"], "--generations must be at least 1"),
        (["--encoding", "genome"], "encoding level 'genome' is not one of"),
        (["--init", "random"], "unknown --init 'random'"),
        (["--ancestor", "/nonexistent/ancestor"], "--ancestor /nonexistent/ancestor: no weights.caffemodel"),
        (["--layers", "conv9"], "cannot evolve conv9"),
        (["--factor-scope", "global"], "factor scope 'global' is not one of: layer, network"),
        (["--layer-factor", "conv1=0.9"], "--layer-factor: expected LAYER:synapse=F or LAYER:cluster=F"),
        (["--layer-factor", "conv1:cluster=1.2"], "factor must be in (0, 1]"),
        (["--layer-factor", "conv9:cluster=0.9"], "layer factors for conv9, which do not evolve"),
        (["--layers", "ip1", "--layer-factor", "conv1:synapse=0.9"], "layer factors for conv1"),
    ],
)
def test_bad_options_are_one_line_and_write_nothing(
    lenet5_dir: Path, data_root: Path, tmp_path, options, message
):
    out = tmp_path / "run"
    result = _cli(
        "evolve", "--recipe", str(lenet5_dir), "--data-root", str(data_root), "--out", str(out), *options
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not out.exists()


def test_missing_data_and_mismatched_ancestor(
    lenet5_dir: Path, data_root: Path, uninterrupted: Path, tmp_path
):
    out = tmp_path / "run"
    result = _cli(
        "evolve", "--recipe", str(lenet5_dir), "--data-root", str(tmp_path / "nodata"), "--out", str(out)
    )
    assert result.returncode == 2 and "not found at" in result.stderr and not out.exists()
    wide = tmp_path / "wide"
    shutil.copytree(lenet5_dir, wide)
    for name in ("deploy.prototxt", "train_val.prototxt"):
        (wide / name).write_text((wide / name).read_text().replace("num_output: 20", "num_output: 16"))
    result = _cli(
        "evolve", "--recipe", str(wide), "--data-root", str(data_root), "--out", str(out),
        "--ancestor", str(uninterrupted / "gen_000"),
    )  # fmt: skip
    assert result.returncode == 2 and "layer 'conv1' blob 0 is (20, 1, 5, 5)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_python_layers_are_refused_without_opt_in(lenet5_dir: Path, data_root: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "py"
    shutil.copytree(lenet5_dir, recipe)
    deploy = recipe / "deploy.prototxt"
    deploy.write_text(deploy.read_text() + 'layer { name: "p" type: "Python" bottom: "prob" top: "q" }\n')
    out = tmp_path / "run"
    result = _cli("evolve", "--recipe", str(recipe), "--data-root", str(data_root), "--out", str(out))
    assert result.returncode == 2 and "--allow-python-layers" in result.stderr and not out.exists()


def test_existing_run_folder_is_refused(uninterrupted: Path, small_recipe: Path, data_root: Path) -> None:
    with pytest.raises(CaffeEvoError, match="already exists; use --resume"):
        start(small_config(small_recipe, data_root), uninterrupted)


@pytest.mark.parametrize(
    "text, message",
    [
        ("generations: many\n", "configuration generations: expected int, got 'many'"),
        ("encoding: {levl: cluster}\n", "unknown encoding keys: levl"),
        ("speed: 3\n", "unknown configuration keys: speed"),
        ("generations: [1, 2\n", "not valid YAML/JSON"),
        ("- 1\n- 2\n", "expected a mapping of option names to values"),
        ("layer_factors: {conv1: 0.9}\n", "layer factor for 'conv1' must give synapse and/or cluster"),
        ("layer_factors: {conv1: {neuron: 0.9}}\n", "layer factor for 'conv1' must give synapse"),
        ("layer_factors: [conv1]\n", "layer_factors must map layer names to levels"),
        ("offspring_solver: {lr_polcy: poly}\n", "solver option lr_polcy: 'poly' is not valid"),
        ("solver_overrides: {max_iter: many}\n", "solver option max_iter: 'many' is not valid"),
        ("offspring_solver: poly\n", "configuration offspring_solver: expected dict[str, Any], got 'poly'"),
    ],
)
def test_bad_config_file(lenet5_dir: Path, data_root: Path, tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(text)
    out = tmp_path / "run"
    result = _cli("evolve", "--recipe", str(lenet5_dir), "--config", str(config), "--out", str(out))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not out.exists()


def test_the_recipes_evolution_config_is_valid(lenet5_dir: Path, data_root: Path, tmp_path: Path) -> None:
    import yaml

    values = yaml.safe_load((lenet5_dir / "evolution.yaml").read_text())
    config = EvolutionConfig.from_json({"recipe": str(lenet5_dir), "data_root": str(data_root), **values})
    evo = Evolution(config, tmp_path / "run", progress=False)
    environment = evo.environment
    assert (
        environment.layer_cluster["conv1"].at(1) == 0.9 and environment.layer_synapse["conv1"].at(5) == 0.97
    )
    assert set(environment.layer_cluster) == {"conv1", "conv2"} and environment.cluster.at(13) == 0.78
    assert config.generations == 13 and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "text, options, message",
    [
        (b"accuracy_floor: high\n", [], "configuration accuracy_floor: expected float | None, got 'high'"),
        (b"ancestor_iters: 1.5\n", [], "configuration ancestor_iters: expected int | None, got 1.5"),
        (b"data_root: 7\n", [], "configuration data_root: expected str | None, got 7"),
        (b"layers: conv1\n", [], "configuration layers: expected list[str] | None, got 'conv1'"),
        (b"layers: [1]\n", [], "configuration layers: expected list[str] | None, got [1]"),
        (b"recipe: 5\n", None, "configuration recipe: expected str, got 5"),
        (b"encoding: cluster\n", [], "configuration encoding: expected a mapping, got 'cluster'"),
        (b"encoding: cluster\n", ["--granularity", "kernel"], "configuration encoding: expected a mapping"),
        (
            b"layer_factors: {conv1: 0.9}\n",
            ["--layer-factor", "conv1:cluster=0.9"],
            "layer factor for 'conv1' must give synapse and/or cluster factors, got 0.9",
        ),
        (b"layers: []\n", [], "--layers must name at least one layer"),
        (b"seed: 1\n", ["--layers", ""], "--layers must name at least one layer"),
        (b"generations: \xff\n", [], "not a UTF-8 text file (invalid start byte at byte 13)"),
    ],
)
def test_config_values_of_the_wrong_type(
    lenet5_dir: Path, tmp_path: Path, text: bytes, options: list[str] | None, message: str
) -> None:
    """A --config file (or option) whose value has the wrong type is one line, before anything is written."""
    config = tmp_path / "bad.yaml"
    config.write_bytes(text)
    out = tmp_path / "run"
    recipe = ["--recipe", str(lenet5_dir)] if options is not None else []
    result = _cli("evolve", *recipe, "--config", str(config), "--out", str(out), *(options or []))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("caffe-evo: ") and message in lines[0], lines
    assert not out.exists()
