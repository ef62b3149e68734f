"""Caffe ``Datum`` LMDBs: the on-disk format that Caffe's ``Data`` layer reads.

Keys are ``%08d`` record indices, as Caffe's own ``convert_mnist_data`` writes them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import lmdb
import numpy as np

from caffe_evo.atomic import atomic_path
from caffe_evo.errors import CaffeEvoError

_COMMIT_EVERY = 5000
INFO_FILE = "info.json"


def _caffe_pb2():
    from caffe_evo.caffe_env import caffe_pb2

    return caffe_pb2()


def write_datum_lmdb(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write ``images`` (N, C, H, W) uint8 and integer ``labels`` to a new LMDB at ``path``."""
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
    pb2 = _caffe_pb2()
    n, channels, height, width = images.shape
    # Size the map for the payload plus protobuf and B-tree overhead; LMDB's default is only 10 MiB.
    map_size = max(1 << 24, int(images.nbytes * 1.5) + n * 256)
    env = lmdb.open(str(path), map_size=map_size, subdir=True, lock=False)
    try:
        datum = pb2.Datum(channels=channels, height=height, width=width)
        txn = env.begin(write=True)
        for i in range(n):
            datum.data = images[i].tobytes()
            datum.label = int(labels[i])
            txn.put(b"%08d" % i, datum.SerializeToString())
            if (i + 1) % _COMMIT_EVERY == 0:
                txn.commit()
                txn = env.begin(write=True)
        txn.commit()
        env.sync()
    finally:
        env.close()


def write_dataset(out_dir: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], info: dict) -> None:
    """Write ``<split>_lmdb`` per split and ``info.json`` into ``out_dir`` as one atomic folder."""
    with atomic_path(Path(out_dir), directory=True) as tmp:
        for name, (images, labels) in splits.items():
            write_datum_lmdb(tmp / f"{name}_lmdb", images, labels)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def iter_datum_lmdb(path: Path) -> Iterator[tuple[bytes, np.ndarray, int]]:
    """Yield ``(key, image CHW uint8, label)`` in key order."""
    path = Path(path)
    if not (path / "data.mdb").is_file():
        raise CaffeEvoError(f"{path}: not an LMDB (no data.mdb)")
    pb2 = _caffe_pb2()
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            for key, value in txn.cursor():
                datum = pb2.Datum.FromString(value)
                shape = (datum.channels, datum.height, datum.width)
                yield key, np.frombuffer(datum.data, dtype=np.uint8).reshape(shape), datum.label
    finally:
        env.close()


def count_records(path: Path) -> int:
    path = Path(path)
    if not (path / "data.mdb").is_file():
        raise CaffeEvoError(f"{path}: not an LMDB (no data.mdb)")
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        return env.stat()["entries"]
    finally:
        env.close()
