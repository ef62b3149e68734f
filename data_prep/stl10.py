"""STL-10 from the official binary release (``stl10_binary``) into LMDBs.

The dataset directory holds ``train_lmdb`` (train_X/train_y, 5,000 records in the official set),
``test_lmdb`` (test_X/test_y, 8,000), the held-out ``train_noval_lmdb`` and ``val_lmdb`` (the last
``val_size`` training records, 500 by default) and ``info.json``; records are 3x96x96 uint8 in BGR order with
labels 0..9. ``unlabeled_X.bin`` (100,000 images without labels) is ignored: Caffe's supervised
``Data`` layer has no use for it. ``fold_indices.txt`` is ignored too; ``class_names.txt`` is optional.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from caffe_evo.errors import CaffeEvoError
from data_prep.cifar10 import held_out, read_label_names, sha256
from data_prep.idx import read_bytes
from data_prep.lmdb_io import write_dataset

SHAPE = (3, 96, 96)
IMAGE_BYTES = SHAPE[0] * SHAPE[1] * SHAPE[2]
NUM_CLASSES = 10
SPLITS = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin")}
CLASS_NAMES_FILE = "class_names.txt"


def parse_stl10_split(
    x_data: bytes, y_data: bytes, x_name: str, y_name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Decode official STL-10 image and label bytes into (N, 3, 96, 96) uint8 BGR images and labels 0..9."""
    if not x_data or len(x_data) % IMAGE_BYTES:
        raise CaffeEvoError(
            f"{x_name}: {len(x_data)} bytes is not a non-zero multiple of the {IMAGE_BYTES}-byte STL-10 image"
        )
    count = len(x_data) // IMAGE_BYTES
    if len(y_data) != count:
        raise CaffeEvoError(f"{y_name}: {len(y_data)} labels but {x_name} holds {count} images")
    labels = np.frombuffer(y_data, dtype=np.uint8).astype(np.int64)
    bad = np.flatnonzero((labels < 1) | (labels > NUM_CLASSES))
    if bad.size:
        raise CaffeEvoError(
            f"{y_name}: record {bad[0]} has label {labels[bad[0]]}, STL-10 labels are 1..{NUM_CLASSES}"
        )
    # Each channel is stored column-major (MATLAB order), so the last two axes come out as (x, y):
    # swap them for row-major, and reverse the R, G, B channels for Caffe's BGR.
    stored = np.frombuffer(x_data, dtype=np.uint8).reshape((-1, *SHAPE))
    images = np.ascontiguousarray(stored.transpose(0, 1, 3, 2)[:, ::-1])
    return images, labels - 1


def read_stl10_split(x_path: Path, y_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one official X/y pair: (N, 3, 96, 96) uint8 BGR row-major images and int64 labels 0..9."""
    return parse_stl10_split(read_bytes(x_path), read_bytes(y_path), str(x_path), str(y_path))


def convert_stl10(source: Path, out_dir: Path, val_size: int = 500) -> dict:
    """Check the train and test X/y files in ``source`` and convert them into the LMDBs under ``out_dir``.

    Everything is read and validated before ``out_dir`` is touched.
    """
    source = Path(source)
    if not source.is_dir():
        raise CaffeEvoError(f"{source}: STL-10 source directory not found")
    wanted = [name for pair in SPLITS.values() for name in pair]
    missing = [name for name in wanted if not (source / name).is_file()]
    if missing:
        raise CaffeEvoError(f"{source}: missing STL-10 file(s): {', '.join(missing)}")
    digests: dict[str, str] = {}
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, (x_name, y_name) in SPLITS.items():
        x_data, y_data = read_bytes(source / x_name), read_bytes(source / y_name)
        digests[x_name], digests[y_name] = sha256(x_data), sha256(y_data)
        splits[split] = parse_stl10_split(x_data, y_data, str(source / x_name), str(source / y_name))
        del x_data, y_data  # free the raw bytes (221 MB for test_X) before reading the next split
    splits.update(held_out(splits["train"], val_size))
    info = {
        "dataset": "stl10",
        "source": str(source),
        "source_files": {split: list(pair) for split, pair in SPLITS.items()},
        "sha256": digests,
        "records": {name: len(labels) for name, (_, labels) in splits.items()},
        "val_size": val_size,
        "shape": list(SHAPE),
        "channel_order": "BGR",
        "label_names": read_label_names(source / CLASS_NAMES_FILE, NUM_CLASSES),
    }
    write_dataset(out_dir, splits, info)
    return info
