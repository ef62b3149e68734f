"""MNIST / Fashion-MNIST conversion: real files in, Caffe Datum LMDBs out, bad input refused cleanly."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import no_partials

from caffe_evo.errors import CaffeEvoError
from data_prep.idx import IMAGES_MAGIC, load_split, parse_idx, read_bytes
from data_prep.lmdb_io import count_records, iter_datum_lmdb
from data_prep.mnist import MNIST, convert_idx_dataset


def test_record_counts(data_root: Path) -> None:
    for dataset in ("mnist", "fashion-mnist"):
        counts = {
            s: count_records(data_root / dataset / f"{s}_lmdb")
            for s in ("train", "test", "train_noval", "val")
        }
        assert counts == {"train": 60000, "test": 10000, "train_noval": 55000, "val": 5000}, dataset


@pytest.mark.parametrize("split, prefix", [("test", "t10k"), ("train", "train")])
def test_lmdb_round_trip_equals_idx(data_root: Path, mnist_raw: Path, split: str, prefix: str) -> None:
    images, labels = load_split(
        mnist_raw / f"{prefix}-images-idx3-ubyte", mnist_raw / f"{prefix}-labels-idx1-ubyte", MNIST.checksums
    )
    n = 0
    for key, image, label in iter_datum_lmdb(data_root / "mnist" / f"{split}_lmdb"):
        assert key == b"%08d" % n
        assert image.shape == (1, 28, 28)
        assert np.array_equal(image[0], images[n])
        assert label == labels[n]
        n += 1
    assert n == len(labels)


def test_val_split_is_the_tail_of_train(data_root: Path) -> None:
    train = list(iter_datum_lmdb(data_root / "mnist" / "train_lmdb"))
    val = list(iter_datum_lmdb(data_root / "mnist" / "val_lmdb"))
    for i in (0, 1234, 4999):
        assert np.array_equal(val[i][1], train[55000 + i][1]) and val[i][2] == train[55000 + i][2]


def _copy_raw(mnist_raw: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in MNIST.checksums:
        shutil.copy(mnist_raw / name, dest / name)
    return dest


def test_wrong_checksum_leaves_nothing(mnist_raw: Path, tmp_path: Path) -> None:
    source = _copy_raw(mnist_raw, tmp_path / "raw")
    labels = source / "t10k-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[100] = (data[100] + 1) % 10
    labels.write_bytes(bytes(data))
    out = tmp_path / "out" / "mnist"
    with pytest.raises(CaffeEvoError, match="MD5 .* does not match"):
        convert_idx_dataset(MNIST, source, out)
    assert not out.exists() and no_partials(out.parent)


def test_missing_file_leaves_nothing(mnist_raw: Path, tmp_path: Path) -> None:
    source = _copy_raw(mnist_raw, tmp_path / "raw")
    (source / "train-images-idx3-ubyte").unlink()
    out = tmp_path / "mnist"
    with pytest.raises(CaffeEvoError, match="train-images-idx3-ubyte: file not found"):
        convert_idx_dataset(MNIST, source, out)
    assert not out.exists()


def test_bad_magic_and_truncation(mnist_raw: Path) -> None:
    data = read_bytes(mnist_raw / "t10k-images-idx3-ubyte")
    assert parse_idx(data, IMAGES_MAGIC, "ok").shape == (10000, 28, 28)
    with pytest.raises(CaffeEvoError, match="bad IDX magic number 2049"):
        parse_idx(b"\x00\x00\x08\x01" + data[4:], IMAGES_MAGIC, "x")
    with pytest.raises(CaffeEvoError, match="IDX size mismatch"):
        parse_idx(data[:-1], IMAGES_MAGIC, "x")
    with pytest.raises(CaffeEvoError, match="truncated"):
        parse_idx(data[:5], IMAGES_MAGIC, "x")


def test_cli_reports_one_line_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "caffe_evo.cli",
            "data",
            "mnist",
            "--source",
            str(tmp_path / "raw"),
            "--data-root",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("caffe-evo: ") and "file not found" in lines[0]
    assert not (tmp_path / "data" / "mnist").exists()


@pytest.mark.parametrize("dataset", ["fashion32", "fashion96", "digit-scenes", "trees"])
def test_val_size_is_refused_where_the_splits_are_fixed(tmp_path: Path, dataset: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "caffe_evo.cli",
            "data",
            dataset,
            "--val-size",
            "100",
            "--data-root",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"caffe-evo: --val-size applies to mnist, fashion-mnist, cifar10, stl10; {dataset} has fixed splits\n"
    )
    assert list(tmp_path.iterdir()) == []
