"""Failures after training keep the training, bad recipes fail before it, resumes extend (issue 11, 3-7)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import RECIPES, short_eval_recipe

from caffe_evo import lineage, masking
from caffe_evo.caffe_env import load_caffe
from caffe_evo.deploy.measure import STAGING_PREFIX, compact_generation
from caffe_evo.encoding import EncodingConfig
from caffe_evo.errors import CaffeEvoError
from caffe_evo.evolution import EvolutionConfig, resume, start
from caffe_evo.recipe import DEPLOY_FILE, SOLVER_FILE, TRAIN_VAL_FILE, Recipe
from caffe_evo.stress import StressConfig, StressSignal
from caffe_evo.synthesis import Environment, Factor
from caffe_evo.training import METRICS_FILE, WEIGHTS_FILE, TrainOptions, train

LENET = RECIPES / "lenet5"


def _recipe_copy(tmp_path: Path, old: str, new: str, files: tuple[str, ...]) -> Path:
    folder = tmp_path / "recipe"
    shutil.copytree(LENET, folder)
    for name in files:
        (folder / name).write_text((folder / name).read_text().replace(old, new))
    return folder


def _config(recipe: Path, data_root: Path, **changes: object) -> EvolutionConfig:
    values = {
        "recipe": str(recipe),
        "data_root": str(data_root),
        "generations": 1,
        "population": 1,
        "ancestor_iters": 30,
        "iters_per_generation": 10,
        "max_accuracy_drop": 1.0,
        "measure": False,
        **changes,
    }
    return EvolutionConfig.from_json(values)


def test_unsupported_layer_is_refused_before_training(tmp_path: Path, data_root: Path) -> None:
    recipe = _recipe_copy(tmp_path, 'type: "ReLU"', 'type: "TanH"', (DEPLOY_FILE, TRAIN_VAL_FILE))
    with pytest.raises(CaffeEvoError, match="type TanH .*--no-measure --keep-unread"):
        start(_config(recipe, data_root), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_recipe_without_val_stage_is_refused_before_training(tmp_path: Path, data_root: Path) -> None:
    recipe = _recipe_copy(tmp_path, 'stage: "val"', 'stage: "holdout"', (SOLVER_FILE, TRAIN_VAL_FILE))
    with pytest.raises(CaffeEvoError, match="no test net of stage val"):
        start(_config(recipe, data_root), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_fp16_overflow_keeps_the_trained_network(tmp_path: Path, data_root: Path) -> None:
    recipe = Recipe.load(LENET, data_root)
    caffe = load_caffe()
    net = caffe.Net(str(LENET / DEPLOY_FILE), caffe.TEST)
    big = net.params["ip2"][0].data.copy()
    big[0, 0] = 1e5  # beyond fp16's 65,504, and a learning rate of 0 keeps it there
    init = {"ip2": [big, net.params["ip2"][1].data.copy()]}
    options = TrainOptions(
        max_iter=2, precision="fp16", init_params=init, solver_overrides={"base_lr": 0.0}, progress=False
    )
    out = tmp_path / "trained"
    with pytest.raises(CaffeEvoError, match="overflows layer 'ip2'.*kept in .*trained.fp32-trained"):
        train(recipe, out, options)
    assert not out.exists()
    kept = tmp_path / "trained.fp32-trained"
    reloaded = caffe.Net(str(kept / DEPLOY_FILE), str(kept / WEIGHTS_FILE), caffe.TEST)
    assert reloaded.params["ip2"][0].data[0, 0] == 1e5
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_no_space_is_one_error_before_caffe_writes(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = shutil.disk_usage(tmp_path)._replace(free=4096)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: full)  # a full disk, as Caffe would meet it
    with pytest.raises(CaffeEvoError, match="4,096 bytes free"):
        train(Recipe.load(LENET, data_root), tmp_path / "out", TrainOptions(max_iter=2, progress=False))
    assert list(tmp_path.iterdir()) == []


def test_os_errors_are_one_line(tmp_path: Path, data_root: Path) -> None:
    (tmp_path / "file").write_text("")
    result = subprocess.run(
        [
            *(sys.executable, "-m", "caffe_evo.cli", "train", "--recipe", str(LENET), "--iters", "2"),
            *("--data-root", str(data_root), "--no-progress", "--out", str(tmp_path / "file" / "out")),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"caffe-evo: {tmp_path / 'file'}: File exists"]


def test_stale_compact_staging_is_removed(tmp_path: Path) -> None:
    caffe = load_caffe()
    gen = tmp_path / "gen_001"
    gen.mkdir()
    shutil.copy(LENET / DEPLOY_FILE, gen / DEPLOY_FILE)
    net = caffe.Net(str(gen / DEPLOY_FILE), caffe.TEST)
    net.save(str(gen / WEIGHTS_FILE))
    masking.save(gen / lineage.MASKS_FILE, {n: net.params[n][0].data != 0 for n in net.params})
    (gen / METRICS_FILE).write_text("{}")
    (gen / f"{STAGING_PREFIX}killed").mkdir()  # what a kill -9 during `caffe-evo compact` leaves
    compact_generation(gen, repeats=1)
    assert sorted(p.name for p in gen.iterdir() if p.name.startswith(".")) == []


def test_resume_extends_and_refuses_lineage_changes(tmp_path: Path, data_root: Path) -> None:
    run = tmp_path / "run"
    start(_config(LENET, data_root), run, progress=False).run()
    # The ancestor trained as a candidate: a run that loses gen_000 builds it again without training.
    trained = lineage.candidate_dir(run, 0, 0, 0) / WEIGHTS_FILE
    assert trained.is_file() and trained.samefile(run / "gen_000" / WEIGHTS_FILE)
    shutil.rmtree(run / "gen_000")
    before = trained.stat().st_mtime_ns
    history = resume(run, progress=False, changes={"generations": 2, "recipe": str(LENET)}).run()
    assert [m["generation"] for m in history] == [0, 1, 2]
    assert trained.stat().st_mtime_ns == before
    assert json.loads((run / lineage.RUN_FILE).read_text())["config"]["generations"] == 2
    assert len(resume(run, progress=False).run()) == 3  # the extension is the run's own now
    with pytest.raises(CaffeEvoError, match="cannot change population, seed"):
        resume(run, changes={"population": 3, "seed": 4, "generations": 5})
    result = subprocess.run(
        [sys.executable, "-m", "caffe_evo.cli", "evolve", "--resume", str(run), "--synapse-factor", "0.5"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "caffe-evo: a resumed run cannot change synapse_factor (they shape its lineage); only "
        "generations, measure, allow_python_layers can change, or start a new run with --out"
    ]


def test_stress_restores_through_the_blobs_not_views(tmp_path: Path, data_root: Path) -> None:
    caffe = load_caffe()
    recipe = Recipe.load(LENET, data_root)
    solver = caffe.get_solver(str(recipe.write_resolved(tmp_path)))
    net = solver.net
    masks = {name: np.ones(net.params[name][0].data.shape, bool) for name in ("conv2", "ip1")}
    factor = Factor((0.5,))
    signal = StressSignal(
        StressConfig("synapse", (0.0,), 1),
        EncodingConfig(),
        Environment(factor, factor),
        1,
        masks,
        frozenset(),
        np.random.default_rng(0),
    )
    signal._solver, signal._net = solver, net
    original = {name: net.params[name][0].data.copy() for name in masks}
    signal.on_start()
    assert (net.params["ip1"][0].data == 0).sum() > 0.3 * original["ip1"].size  # stressed
    blobs = [blob.data for name in masks for blob in net.params[name]]
    held = [value for entry in signal._saved for value in entry if isinstance(value, np.ndarray)]
    assert not any(np.shares_memory(a, b) for a in held for b in blobs)  # nothing a GPU pass leaves stale
    signal.on_gradients_ready()
    for name in masks:
        np.testing.assert_array_equal(net.params[name][0].data, original[name])


def test_recipe_without_test_stage_is_refused_before_training(tmp_path: Path, data_root: Path) -> None:
    recipe = _recipe_copy(tmp_path, 'stage: "test"', 'stage: "final"', (SOLVER_FILE, TRAIN_VAL_FILE))
    with pytest.raises(CaffeEvoError, match="no test net of stage test") as refused:
        start(_config(recipe, data_root), tmp_path / "run")
    assert "\n" not in str(refused.value) and not (tmp_path / "run").exists()


def test_a_run_started_with_relative_paths_resumes_from_another_folder(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, other = tmp_path / "first", tmp_path / "other"
    short_eval_recipe(first / "lenet5")
    other.mkdir()
    monkeypatch.chdir(first)
    start(_config(Path("lenet5"), Path(os.path.relpath(data_root))), Path("run"), progress=False).run()
    stored = json.loads((first / "run" / lineage.RUN_FILE).read_text())["config"]
    assert stored["recipe"] == str(first.resolve() / "lenet5") and stored["data_root"] == str(data_root)
    monkeypatch.chdir(other)
    history = resume(first / "run", progress=False, changes={"generations": 2}).run()
    assert [m["generation"] for m in history] == [0, 1, 2]
