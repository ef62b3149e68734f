"""Reader for the IDX format of MNIST and Fashion-MNIST (big-endian header, uint8 payload)."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np

from caffe_evo.errors import CaffeEvoError

IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension


def read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it ends in ``.gz``."""
    path = Path(path)
    if not path.is_file():
        raise CaffeEvoError(f"{path}: file not found")
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise CaffeEvoError(f"{path}: cannot read ({exc})") from None


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def parse_idx(data: bytes, expected_magic: int, name: str) -> np.ndarray:
    """Parse IDX bytes into an array of shape (N,) for labels or (N, rows, cols) for images."""
    if len(data) < 8:
        raise CaffeEvoError(f"{name}: truncated IDX file ({len(data)} bytes)")
    magic = int.from_bytes(data[0:4], "big")
    if magic != expected_magic:
        raise CaffeEvoError(f"{name}: bad IDX magic number {magic}, expected {expected_magic}")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise CaffeEvoError(
            f"{name}: IDX size mismatch: header says {dims} ({expected} bytes), file has {len(data)}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_split(images_path: Path, labels_path: Path, checksums: dict[str, str] | None) -> tuple:
    """Read one images/labels pair, verifying MD5s of the uncompressed content when given."""
    arrays = []
    for path, magic in ((images_path, IMAGES_MAGIC), (labels_path, LABELS_MAGIC)):
        data = read_bytes(path)
        if checksums is not None:
            want = checksums[Path(path).name.removesuffix(".gz")]
            got = md5(data)
            if got != want:
                raise CaffeEvoError(f"{path}: MD5 {got} does not match the official {want}")
        arrays.append(parse_idx(data, magic, str(path)))
    images, labels = arrays
    if len(images) != len(labels):
        raise CaffeEvoError(f"{images_path}: {len(images)} images but {len(labels)} labels")
    return images, labels
