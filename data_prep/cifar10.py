"""CIFAR-10 from the official *binary* release (``cifar-10-batches-bin``) into LMDBs.

The dataset directory holds ``train_lmdb`` (data_batch_1..5 in order, 50,000 records in the official
set), ``test_lmdb`` (test_batch, 10,000), a held-out split for model selection as for MNIST,
``train_noval_lmdb`` and ``val_lmdb`` (the last ``val_size`` training records, 5,000 by default), and
``info.json``. All five training batches are required: a
missing one almost always means an interrupted download, and training silently on 4/5 of the data
would make results incomparable with anything else. Records are 3x32x32 uint8 in BGR order, since
Caffe's colour pipeline (and its own ``convert_cifar_data``-trained models) expect BGR.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from caffe_evo.errors import CaffeEvoError
from data_prep.idx import read_bytes
from data_prep.lmdb_io import write_dataset

SHAPE = (3, 32, 32)
RECORD_BYTES = 1 + SHAPE[0] * SHAPE[1] * SHAPE[2]  # label byte, then the R, G and B planes
NUM_CLASSES = 10
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
META_FILE = "batches.meta.txt"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_cifar10_batch(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Split CIFAR-10 binary records into (N, 3, 32, 32) uint8 BGR images and int64 labels 0..9."""
    if not data or len(data) % RECORD_BYTES:
        raise CaffeEvoError(
            f"{name}: {len(data)} bytes is not a non-zero multiple of the {RECORD_BYTES}-byte CIFAR-10 record"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    bad = np.flatnonzero(labels >= NUM_CLASSES)
    if bad.size:
        raise CaffeEvoError(
            f"{name}: record {bad[0]} has label {labels[bad[0]]}, CIFAR-10 labels are 0..{NUM_CLASSES - 1}"
        )
    # The planes are stored R, G, B; reversing the channel axis gives Caffe's BGR.
    images = np.ascontiguousarray(records[:, 1:].reshape((-1, *SHAPE))[:, ::-1])
    return images, labels


def held_out(train: tuple[np.ndarray, np.ndarray], val_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``train_noval`` and ``val``: the last ``val_size`` training records are held out for selection."""
    images, labels = train
    if not 0 < val_size < len(labels):
        raise CaffeEvoError(f"--val-size must be between 1 and {len(labels) - 1}, got {val_size}")
    cut = len(labels) - val_size
    return {"train_noval": (images[:cut], labels[:cut]), "val": (images[cut:], labels[cut:])}


def read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one official batch file: (N, 3, 32, 32) uint8 BGR images and int64 labels 0..9."""
    return parse_cifar10_batch(read_bytes(path), str(path))


def read_label_names(path: Path, count: int) -> list[str] | None:
    """The class names in a one-name-per-line file, or None when the (optional) file is absent."""
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    if len(names) != count:
        raise CaffeEvoError(f"{path}: expected {count} class names, found {len(names)}")
    return names


def convert_cifar10(source: Path, out_dir: Path, val_size: int = 5000) -> dict:
    """Check all six batch files in ``source`` and convert them into the LMDBs under ``out_dir``.

    Everything is read and validated before ``out_dir`` is touched; ``batches.meta.txt`` is optional
    and only supplies the class names recorded in ``info.json``.
    """
    source = Path(source)
    if not source.is_dir():
        raise CaffeEvoError(f"{source}: CIFAR-10 source directory not found")
    missing = [name for name in (*TRAIN_FILES, TEST_FILE) if not (source / name).is_file()]
    if missing:
        raise CaffeEvoError(f"{source}: missing CIFAR-10 batch file(s): {', '.join(missing)}")
    digests: dict[str, str] = {}
    batches: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in (*TRAIN_FILES, TEST_FILE):
        data = read_bytes(source / name)
        digests[name] = sha256(data)
        batches[name] = parse_cifar10_batch(data, str(source / name))
    splits = {
        "train": (
            np.concatenate([batches[name][0] for name in TRAIN_FILES]),
            np.concatenate([batches[name][1] for name in TRAIN_FILES]),
        ),
        "test": batches[TEST_FILE],
    }
    splits.update(held_out(splits["train"], val_size))
    info = {
        "dataset": "cifar10",
        "source": str(source),
        "source_files": {"train": list(TRAIN_FILES), "test": [TEST_FILE]},
        "sha256": digests,
        "records": {name: len(labels) for name, (_, labels) in splits.items()},
        "val_size": val_size,
        "shape": list(SHAPE),
        "channel_order": "BGR",
        "label_names": read_label_names(source / META_FILE, NUM_CLASSES),
    }
    write_dataset(out_dir, splits, info)
    return info
