"""`caffe-evo finetune RUN/gen_NNN`: more training with the mask kept, a sibling folder with its compact
network and metrics, shown by the report; the lineage itself unchanged. Real pycaffe, real MNIST."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import short_eval_recipe

from caffe_evo import lineage, masking
from caffe_evo.evolution import EvolutionConfig, read_params, start
from caffe_evo.executors import ExecutorOptions
from caffe_evo.finetune import finetune


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    recipe = short_eval_recipe(tmp_path_factory.mktemp("recipes") / "lenet5-tiny")
    config = EvolutionConfig(
        recipe=str(recipe),
        data_root=str(data_root),
        generations=1,
        population=1,
        seed=6,
        ancestor_iters=60,
        iters_per_generation=20,
        max_accuracy_drop=1.0,
    )
    folder = tmp_path_factory.mktemp("ft") / "run"
    start(config, folder, progress=False, executor=ExecutorOptions(workers=1)).run()
    return folder


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "caffe_evo.cli", *args], capture_output=True, text=True, timeout=600
    )


def _digest(folder: Path) -> str:
    return hashlib.md5(b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())).hexdigest()


def test_finetune_keeps_the_mask_and_writes_a_sibling(run: Path) -> None:
    gen = run / "gen_001"
    before = _digest(gen)
    done = _cli("finetune", str(gen), "--iters", "40", "--no-progress")
    assert done.returncode == 0, done.stderr
    tuned = run / "gen_001_ft40"
    assert f"wrote {tuned}" in done.stdout
    assert _digest(gen) == before  # the lineage is not touched
    masks, kept = masking.load(gen / "masks.npz"), masking.load(tuned / "masks.npz")
    assert all(np.array_equal(masks[name], kept[name]) for name in masks)
    old = read_params(gen / "deploy.prototxt", gen / "weights.caffemodel")
    new = read_params(tuned / "deploy.prototxt", tuned / "weights.caffemodel")
    for name, mask in masks.items():
        assert np.all(new[name][0][~mask] == 0.0)  # pruned synapses stayed pruned
        assert np.any(new[name][0][mask] != old[name][0][mask])  # the living ones trained on
    metrics = lineage.read_json(tuned / "metrics.json")
    source = lineage.read_json(gen / "metrics.json")
    assert metrics["iterations"] == 40 and metrics["finetune_iters"] == 40 and metrics["generation"] == 1
    assert metrics["synapses"] == source["synapses"] and metrics["finetuned_from"] == str(gen)
    assert (tuned / "compact" / "deploy.prototxt").is_file() and metrics["cost"]["compact"]["params"] > 0
    assert lineage.finetunes(run) == [metrics]
    assert [m["generation"] for m in lineage.generations(run)] == [0, 1]

    report = _cli("report", str(run))
    assert report.returncode == 0, report.stderr
    text = (run / "report" / "report.md").read_text()
    assert "## Fine-tuned generations" in text and "| 1 +40 it |" in text
    assert "## Family tree" in text and "<- gen_000" in text


def test_finetune_bad_input(run: Path, tmp_path: Path) -> None:
    for args, message in (
        ([str(run / "gen_001"), "--iters", "0"], "--iters must be positive, got 0"),
        ([str(run), "--iters", "5"], f"{run}: not a generation folder of a run (no metrics.json)"),
        (
            [str(run / "gen_001"), "--iters", "5", "--out", str(run / "gen_000")],
            f"{run / 'gen_000'}: already exists",
        ),
    ):
        done = _cli("finetune", *args, "--no-progress")
        assert done.returncode == 2 and done.stderr.startswith(f"caffe-evo: {message}"), done.stderr
        assert "Traceback" not in done.stderr
    assert not list(run.glob(".*partial-*"))


def test_finetune_reestimates_batchnorm_as_the_run_does(tmp_path: Path, data_root: Path) -> None:
    config = EvolutionConfig(
        recipe=str(Path(__file__).parent / "fixtures" / "resnet_mini"),
        data_root=str(data_root),
        generations=1,
        population=1,
        ancestor_iters=20,
        iters_per_generation=10,
        max_accuracy_drop=1.0,
        bn_batches=3,
        measure=False,
    )
    start(config, tmp_path / "run", progress=False, executor=ExecutorOptions(workers=1)).run()
    metrics = finetune(tmp_path / "run" / "gen_001", 10, progress=False)
    assert metrics["batchnorm_reestimation"]["batches"] == 3
