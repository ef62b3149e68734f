"""KITTI object detection in DIGITS' layout: ``train/images``, ``train/labels``, ``val/images``, ...

One ``ID.txt`` per image (ID an integer, the image ``ID.png`` or ``ID.jpg``), one object per line with the
15 KITTI columns: type, truncated, occluded, alpha, x1, y1, x2, y2 (pixels), 3-D height, width, length,
x, y, z, rotation_y. As in DIGITS' KITTI recipe, only the chosen types (default ``car``) are objects;
``DontCare`` regions and every other type are class 0, which DetectNet's ground truth leaves uncovered.
Images are padded at the bottom and right to the dataset size (DIGITS pads KITTI's 1242x375 to 1248x384).
KITTI itself cannot be downloaded here: this reader is tested on files written in this layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from caffe_evo.detection.groundtruth import GroundTruthParams
from caffe_evo.errors import CaffeEvoError
from data_prep.detection_lmdb import fit_image, read_image, write_detection_dataset

COLUMNS = 15
SPLITS = ("train", "val")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_labels(path: Path, classes: frozenset[str]) -> np.ndarray:
    """The (N, 4) boxes of the objects of ``classes`` in one KITTI label file."""
    boxes = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != COLUMNS:
            raise CaffeEvoError(f"{path}:{number}: {len(fields)} columns, KITTI labels have {COLUMNS}")
        try:
            values = [float(v) for v in fields[1:]]
        except ValueError:
            raise CaffeEvoError(f"{path}:{number}: a non-numeric value in columns 2-{COLUMNS}") from None
        if fields[0].lower() in classes:
            boxes.append(values[3:7])
    return np.asarray(boxes, np.float64).reshape(-1, 4)


def _examples(folder: Path, classes: frozenset[str], params: GroundTruthParams) -> Iterator:
    labels_dir, images_dir = folder / "labels", folder / "images"
    for label in sorted(labels_dir.glob("*.txt"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1):
        if not label.stem.isdigit():
            raise CaffeEvoError(f"{label}: KITTI IDs are integers, got {label.stem!r}")
        image_path = next(
            (
                images_dir / f"{label.stem}{s}"
                for s in IMAGE_SUFFIXES
                if (images_dir / f"{label.stem}{s}").is_file()
            ),
            None,
        )
        if image_path is None:
            raise CaffeEvoError(f"{label}: no image {label.stem}.png or .jpg in {images_dir}")
        boxes = read_labels(label, classes)
        yield fit_image(read_image(image_path), boxes, params, str(label)), boxes


def convert_kitti(
    source: Path, out_dir: Path, params: GroundTruthParams, classes: tuple[str, ...] = ("car",)
) -> dict:
    source = Path(source)
    for split in SPLITS:
        for sub in ("images", "labels"):
            if not (source / split / sub).is_dir():
                raise CaffeEvoError(f"{source / split / sub}: not found (DIGITS' KITTI layout)")
    wanted = frozenset(c.lower() for c in classes)
    splits = {split: _examples(source / split, wanted, params) for split in SPLITS}
    info = {"dataset": "kitti", "source": str(source), "classes": sorted(wanted)}
    return write_detection_dataset(out_dir, splits, params, info)
