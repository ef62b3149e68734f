"""Parse-27k pedestrians as distributed: ``annotations.sqlite3`` and ``sequences/<directory>/<filename>``.

Tables used: ``Pedestrian(pedestrianID, imageID, attributeSetID, box_min_x, box_min_y, box_max_x,
box_max_y)``, ``Image(imageID, filename, sequenceID)``, ``Sequence(sequenceID, directory)``. Every image of a
split's sequences is a record (an image without pedestrians is a negative); the split is by sequence, as
the dataset defines it: train 1, 4, 5; val 2, 7, 8; test 3, 6. Images are scaled by ``scale`` (boxes with
them) and padded to the dataset size. Parse-27k cannot be downloaded here: this reader is tested on a
database and images written in this format.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from caffe_evo.detection.groundtruth import GroundTruthParams
from caffe_evo.errors import CaffeEvoError
from data_prep.detection_lmdb import fit_image, read_image, write_detection_dataset

SPLITS = {"train": (1, 4, 5), "val": (2, 7, 8), "test": (3, 6)}
TABLES = {
    "Pedestrian": {
        "pedestrianID",
        "imageID",
        "attributeSetID",
        "box_min_x",
        "box_min_y",
        "box_max_x",
        "box_max_y",
    },
    "Image": {"imageID", "filename", "sequenceID"},
    "Sequence": {"sequenceID", "directory"},
}


def _check_schema(db: sqlite3.Connection, path: Path) -> None:
    for table, columns in TABLES.items():
        found = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if not columns <= found:
            missing = ", ".join(sorted(columns - found)) if found else "the table"
            raise CaffeEvoError(f"{path}: not a Parse-27k database (table {table}: missing {missing})")


def read_split(database: Path, sequences: tuple[int, ...]) -> list[tuple[Path, np.ndarray]]:
    """(image path relative to the dataset folder, (N, 4) pedestrian boxes) of the split's images."""
    database = Path(database)
    if not database.is_file():
        raise CaffeEvoError(f"{database}: not found")
    try:
        db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        try:
            _check_schema(db, database)
            marks = ",".join("?" * len(sequences))
            images = db.execute(
                "SELECT i.imageID, s.directory, i.filename FROM Image i JOIN Sequence s "
                f"ON i.sequenceID = s.sequenceID WHERE i.sequenceID IN ({marks}) ORDER BY i.imageID",
                sequences,
            ).fetchall()
            boxes: dict[int, list] = {}
            for image_id, *box in db.execute(
                "SELECT imageID, box_min_x, box_min_y, box_max_x, box_max_y FROM Pedestrian "
                "ORDER BY pedestrianID"
            ):
                boxes.setdefault(image_id, []).append(box)
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise CaffeEvoError(f"{database}: not a readable SQLite database ({exc})") from None
    return [
        (
            Path("sequences") / directory / filename,
            np.asarray(boxes.get(image_id, []), np.float64).reshape(-1, 4),
        )
        for image_id, directory, filename in images
    ]


def _examples(source: Path, split: list, params: GroundTruthParams, scale: float) -> Iterator:
    for relative, boxes in split:
        image = read_image(source / relative)
        origin = f"{source / relative} (annotations.sqlite3)"
        fit_image(image, boxes, GroundTruthParams(image.shape[1], image.shape[0]), origin)  # boxes inside
        if scale != 1.0:
            image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            boxes = np.minimum(boxes * scale, [image.shape[1], image.shape[0]] * 2)
        yield fit_image(image, boxes, params, origin), boxes


def convert_parse27k(source: Path, out_dir: Path, params: GroundTruthParams, scale: float = 1.0) -> dict:
    source = Path(source)
    if not 0 < scale <= 1:
        raise CaffeEvoError(f"--scale must be in (0, 1], got {scale}")
    tables = {name: read_split(source / "annotations.sqlite3", seqs) for name, seqs in SPLITS.items()}
    splits = {name: _examples(source, items, params, scale) for name, items in tables.items()}
    info = {"dataset": "parse27k", "source": str(source), "sequences": SPLITS, "scale": scale}
    return write_detection_dataset(out_dir, splits, params, info)
