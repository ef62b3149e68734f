"""Detection datasets: KITTI (DIGITS layout) and Parse-27k (sqlite + sequences) on files written in those
formats, the digit-scene stand-in, and the deepforest tree photographs; bad input is one clear error."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest

from caffe_evo.caffe_env import caffe_pb2
from caffe_evo.detection.groundtruth import GroundTruthParams, boxes_from_labels
from caffe_evo.errors import CaffeEvoError
from data_prep.digit_scenes import convert_digit_scenes
from data_prep.kitti import convert_kitti
from data_prep.parse27k import convert_parse27k
from data_prep.trees import read_voc, tiles
from tests.conftest import no_partials

PARAMS = GroundTruthParams(image_width=96, image_height=64)


def read_split(folder: Path, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image HxWx3, boxes recovered from the label maps) of every record, in key order."""
    pb2 = caffe_pb2()
    records = {}
    for kind in ("images", "labels"):
        env = lmdb.open(str(folder / f"{split}_{kind}_lmdb"), readonly=True, lock=False)
        with env.begin() as txn:
            records[kind] = [pb2.Datum.FromString(value) for _, value in txn.cursor()]
        env.close()
    out = []
    for image, label in zip(records["images"], records["labels"], strict=True):
        pixels = np.frombuffer(image.data, np.uint8).reshape(image.channels, image.height, image.width)
        maps = np.asarray(label.float_data, np.float32).reshape(label.channels, label.height, label.width)
        out.append((pixels.transpose(1, 2, 0), boxes_from_labels(maps[8], maps[1:5], 16)))
    return out


def kitti_line(kind: str, box: tuple[float, ...]) -> str:
    return f"{kind} 0.00 0 -1.57 {' '.join(f'{v:.2f}' for v in box)} 1.5 1.6 3.9 1.0 1.7 20.0 -1.5"


def write_kitti(root: Path, labels: dict[str, dict[str, list[str]]], size=(90, 60)) -> Path:
    rng = np.random.default_rng(0)
    for split, files in labels.items():
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        for stem, lines in files.items():
            (root / split / "labels" / f"{stem}.txt").write_text("\n".join(lines) + "\n")
            image = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            cv2.imwrite(str(root / split / "images" / f"{stem}.png"), image)
    return root


def test_kitti_reader(tmp_path: Path) -> None:
    source = write_kitti(
        tmp_path / "kitti",
        {
            "train": {
                "000010": [kitti_line("Car", (10, 12, 50, 40)), kitti_line("DontCare", (60, 5, 80, 20))],
                "2": [kitti_line("Pedestrian", (5, 5, 20, 50)), kitti_line("car", (40.5, 20, 88, 58))],
            },
            "val": {"000003": [kitti_line("Van", (1, 1, 30, 30))]},
        },
    )
    info = convert_kitti(source, tmp_path / "out", PARAMS)
    assert info["records"] == {"train": 2, "val": 1} and info["boxes"] == {"train": 2, "val": 0}
    train = read_split(tmp_path / "out", "train")
    # Integer order (2 before 10); only cars; the image padded at the bottom and right to 96x64.
    np.testing.assert_allclose(train[0][1], [[40.5, 20, 88, 58]])
    np.testing.assert_allclose(train[1][1], [[10, 12, 50, 40]])
    original = cv2.imread(str(source / "train" / "images" / "2.png"))
    np.testing.assert_array_equal(train[0][0][:60, :90], original)
    assert not train[0][0][60:].any() and not train[0][0][:, 90:].any()
    assert json.loads((tmp_path / "out" / "info.json").read_text())["groundtruth"]["stride"] == 16


@pytest.mark.parametrize(
    "stem, line, message",
    [
        ("7", "Car 0 0 0 1 2 3 4", r"7.txt:1: 8 columns, KITTI labels have 15"),
        ("7", kitti_line("Car", (10, 10, 95, 20)), r"7.txt: box .* outside the 90x60 image"),
        ("x7", kitti_line("Car", (1, 1, 5, 5)), r"x7.txt: KITTI IDs are integers"),
        ("7", kitti_line("Car", (1, 1, 5, 5)).replace("0.00", "zero"), r"7.txt:1: a non-numeric value"),
    ],
)
def test_kitti_bad_input(tmp_path: Path, stem: str, line: str, message: str) -> None:
    source = write_kitti(tmp_path / "kitti", {"train": {stem: [line]}, "val": {"1": []}})
    with pytest.raises(CaffeEvoError, match=message):
        convert_kitti(source, tmp_path / "out", PARAMS)
    assert not (tmp_path / "out").exists() and no_partials(tmp_path)


def write_parse27k(root: Path, pedestrians: dict[int, list[tuple]], broken: str | None = None) -> Path:
    """Sequences 1-8, one image each (imageID = sequence), pedestrians by imageID."""
    root.mkdir()
    db = sqlite3.connect(root / "annotations.sqlite3")
    db.execute("CREATE TABLE Sequence (sequenceID INTEGER PRIMARY KEY, directory TEXT)")
    db.execute("CREATE TABLE Image (imageID INTEGER PRIMARY KEY, filename TEXT, sequenceID INTEGER)")
    columns = "pedestrianID INTEGER PRIMARY KEY, imageID INTEGER, attributeSetID INTEGER, "
    columns += "box_min_x REAL, box_min_y REAL, box_max_x REAL, box_max_y REAL"
    db.execute(f"CREATE TABLE {'Walker' if broken == 'table' else 'Pedestrian'} ({columns})")
    for seq in range(1, 9):
        db.execute("INSERT INTO Sequence VALUES (?, ?)", (seq, f"seq{seq:02d}"))
        db.execute("INSERT INTO Image VALUES (?, ?, ?)", (seq, f"{seq:06d}.jpg", seq))
        folder = root / "sequences" / f"seq{seq:02d}"
        folder.mkdir(parents=True)
        image = np.full((60, 80, 3), 20 * seq, np.uint8)
        if broken == "image" and seq == 4:
            (folder / f"{seq:06d}.jpg").write_bytes(b"not a jpeg")
        else:
            cv2.imwrite(str(folder / f"{seq:06d}.jpg"), image)
    for image_id, boxes in pedestrians.items():
        for box in boxes:
            db.execute("INSERT INTO Pedestrian VALUES (NULL, ?, 0, ?, ?, ?, ?)", (image_id, *box))
    db.commit()
    db.close()
    return root


def test_parse27k_reader_splits_by_sequence(tmp_path: Path) -> None:
    source = write_parse27k(tmp_path / "parse", {1: [(10, 10, 30, 50)], 2: [(5, 5, 25, 45), (40, 4, 70, 56)]})
    info = convert_parse27k(source, tmp_path / "out", PARAMS)
    assert info["records"] == {"train": 3, "val": 3, "test": 2}
    assert info["boxes"] == {"train": 1, "val": 2, "test": 0}
    train, val = read_split(tmp_path / "out", "train"), read_split(tmp_path / "out", "val")
    # Train is sequences 1, 4, 5 in image order; each image's grey level identifies its sequence.
    assert [int(image[0, 0, 0]) for image, _ in train] == [20, 80, 100]
    assert [int(image[0, 0, 0]) for image, _ in val] == [40, 140, 160]
    np.testing.assert_allclose(train[0][1], [[10, 10, 30, 50]])
    np.testing.assert_allclose(val[0][1], [[5, 5, 25, 45], [40, 4, 70, 56]])
    half = convert_parse27k(source, tmp_path / "half", PARAMS, scale=0.5)
    assert half["boxes"]["val"] == 2
    np.testing.assert_allclose(
        read_split(tmp_path / "half", "val")[0][1], [[2.5, 2.5, 12.5, 22.5], [20, 2, 35, 28]]
    )


@pytest.mark.parametrize(
    "broken, pedestrians, message",
    [
        (
            "table",
            {},
            r"annotations.sqlite3: not a Parse-27k database \(table Pedestrian: missing the table\)",
        ),
        ("image", {}, r"seq04/000004.jpg: not a readable image"),
        (
            None,
            {3: [(10, 10, 90, 50)]},
            r"000003.jpg \(annotations.sqlite3\): box .* outside the 80x60 image",
        ),
    ],
)
def test_parse27k_bad_input(tmp_path: Path, broken, pedestrians, message) -> None:
    source = write_parse27k(tmp_path / "parse", pedestrians, broken)
    with pytest.raises(CaffeEvoError, match=message):
        convert_parse27k(source, tmp_path / "out", PARAMS)
    assert not (tmp_path / "out").exists() and no_partials(tmp_path)


def test_digit_scenes_are_seeded_and_boxed(tmp_path: Path, data_root: Path) -> None:
    counts = {"train": 6, "val": 3, "test": 3}
    args = (data_root / "mnist", data_root / "fashion-mnist")
    info = convert_digit_scenes(*args, tmp_path / "a", counts, size=64, seed=3)
    convert_digit_scenes(*args, tmp_path / "b", counts, size=64, seed=3)
    assert info["records"] == counts and "stand_in" in info
    for split in counts:
        a, b = read_split(tmp_path / "a", split), read_split(tmp_path / "b", split)
        for (image_a, boxes_a), (image_b, boxes_b) in zip(a, b, strict=True):
            np.testing.assert_array_equal(image_a, image_b)
            np.testing.assert_array_equal(boxes_a, boxes_b)
            assert len(boxes_a) >= 1 and (boxes_a >= 0).all() and (boxes_a <= 64).all()
    assert sum(len(boxes) for _, boxes in read_split(tmp_path / "a", "val")) == info["boxes"]["val"]


def test_trees_voc_and_tiling() -> None:
    xml = (
        "<annotation><filename>t.png</filename><size><width>200</width><height>100</height></size>"
        "<object><name>Tree</name><bndbox><xmin>10</xmin><ymin>10</ymin><xmax>30</xmax><ymax>40</ymax></bndbox>"
        "</object><object><name>Tree</name><bndbox><xmin>90</xmin><ymin>20</ymin><xmax>130</xmax>"
        "<ymax>50</ymax></bndbox></object></annotation>"
    )
    name, width, height, boxes = read_voc(xml, "t.xml")
    assert (name, width, height) == ("t.png", 200, 100)
    pieces = list(tiles(np.zeros((100, 200, 3), np.uint8), boxes, 100))
    # The second box has 10 of its 40 columns in tile 0 (dropped there) and 30 in tile 1 (kept, clipped).
    np.testing.assert_allclose(pieces[0][1], [[10, 10, 30, 40]])
    np.testing.assert_allclose(pieces[1][1], [[0, 20, 30, 50]])
    with pytest.raises(CaffeEvoError, match="t.xml: box .* outside the 200x100 image"):
        read_voc(xml.replace("<xmax>130", "<xmax>230"), "t.xml")
