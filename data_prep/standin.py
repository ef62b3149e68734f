"""Fashion-MNIST in the shapes of CIFAR-10 (3x32x32) and STL-10 (3x96x96): stand-ins, never the real sets.

Neither CIFAR-10 nor STL-10 can be had on these machines, so their recipes train here on Fashion-MNIST
reshaped to their input: each 28x28 image is enlarged by pixel repetition (x1 for 32x32, x3 for 96x96),
centred on a zero border and copied into all three channels. The nets, solvers and pipeline are then the
ones a CIFAR-10 or STL-10 user runs; the accuracies are Fashion-MNIST's and are always labelled so.
The STL-10 stand-in also takes STL-10's sizes (5,000 labelled training images, 8,000 test images).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from caffe_evo.errors import CaffeEvoError
from data_prep.lmdb_io import write_dataset
from data_prep.mnist import FASHION_MNIST, load_idx_dataset


@dataclass(frozen=True)
class StandIn:
    """How a stand-in is made from Fashion-MNIST: side length, enlargement, and how many images."""

    name: str
    stands_for: str
    side: int
    repeat: int  # each source pixel becomes repeat x repeat pixels
    train: int  # images taken from the start of the official training set (train_noval + val)
    test: int  # images taken from the start of the official test set
    val: int  # the last `val` of the taken training images


STAND_INS = {
    s.name: s
    for s in (
        StandIn("fashion32", "cifar10", side=32, repeat=1, train=60000, test=10000, val=5000),
        StandIn("fashion96", "stl10", side=96, repeat=3, train=5000, test=8000, val=500),
    )
}


def reshape(images: np.ndarray, spec: StandIn) -> np.ndarray:
    """(N, 28, 28) uint8 -> (N, 3, side, side) uint8: enlarged, centred on zeros, one copy per channel."""
    big = images.repeat(spec.repeat, axis=1).repeat(spec.repeat, axis=2)
    border = (spec.side - big.shape[1]) // 2
    if border < 0 or big.shape[1] + 2 * border != spec.side:
        raise CaffeEvoError(f"{spec.name}: {images.shape[1:]} images do not fit {spec.side}x{spec.side}")
    out = np.zeros((len(images), 3, spec.side, spec.side), dtype=np.uint8)
    out[:, :, border : border + big.shape[1], border : border + big.shape[2]] = big[:, None]
    return out


def convert_standin(name: str, source: Path, out_dir: Path) -> dict:
    """Write the stand-in ``name`` from the Fashion-MNIST IDX files in ``source`` into ``out_dir``.

    Splits as the recipes read them: ``train_noval_lmdb``, ``val_lmdb`` (held out, for selection) and
    ``test_lmdb`` (reported only).
    """
    spec = STAND_INS[name]
    train_x, train_y, test_x, test_y = load_idx_dataset(FASHION_MNIST, source)
    cut = spec.train - spec.val
    splits = {
        "train_noval": (reshape(train_x[:cut], spec), train_y[:cut]),
        "val": (reshape(train_x[cut : spec.train], spec), train_y[cut : spec.train]),
        "test": (reshape(test_x[: spec.test], spec), test_y[: spec.test]),
    }
    info = {
        "dataset": name,
        "stand_in_for": spec.stands_for,
        "made_from": "fashion-mnist",
        "source": str(source),
        "md5_uncompressed": FASHION_MNIST.checksums,
        "records": {key: len(y) for key, (_, y) in splits.items()},
        "shape": [3, spec.side, spec.side],
        "transform": f"pixels repeated {spec.repeat}x, centred on a zero border, grey copied to 3 channels",
    }
    write_dataset(out_dir, splits, info)
    return info
