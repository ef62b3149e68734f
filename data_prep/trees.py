"""Real aerial photographs with 951 tree-crown boxes, from the PyPI wheel ``deepforest==2.1.0``.

The wheel's ``deepforest/data/`` holds four annotated images (Pascal VOC XML, class ``Tree``); only those
files are read, deepforest itself is never installed or imported. The split is by image, so no crown is
in two splits: train ``2019_YELL_2_528000_4978000_image_crop2`` (574 boxes), val
``2019_YELL_2_541000_4977000_image_crop`` (279), test ``OSBS_029`` and ``SOAP_061`` (61 + 37). Images are
cut into square tiles (the last row and column padded); a box belongs to a tile, clipped to it, when at
least half of its area lies inside, and is dropped from a tile otherwise.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from caffe_evo.atomic import atomic_path
from caffe_evo.detection.groundtruth import GroundTruthParams, check_boxes
from caffe_evo.errors import CaffeEvoError
from data_prep.detection_lmdb import fit_image, write_detection_dataset

WHEEL = "deepforest-2.1.0-py3-none-any.whl"
WHEEL_SHA256 = "8c2798d8e9be7f0004b194fe207b76c1d9fff6e711b3db67b9508dcd5d00ae54"
SPLITS = {
    "train": ("2019_YELL_2_528000_4978000_image_crop2",),
    "val": ("2019_YELL_2_541000_4977000_image_crop",),
    "test": ("OSBS_029", "SOAP_061"),
}


def fetch_wheel(cache: Path) -> Path:
    """``pip download`` the wheel into ``cache`` once; its SHA-256 is checked every time."""
    path = Path(cache) / WHEEL
    if not path.is_file():
        Path(cache).mkdir(parents=True, exist_ok=True)
        with atomic_path(Path(cache) / "deepforest-wheel", directory=True) as tmp:
            result = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "deepforest==2.1.0", "-d", str(tmp)],
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                last = (result.stderr.strip().splitlines() or ["no output"])[-1]
                raise CaffeEvoError(f"pip download deepforest==2.1.0 failed: {last}")
            shutil.move(tmp / WHEEL, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise CaffeEvoError(f"{path}: SHA-256 {digest} is not the deepforest 2.1.0 wheel's")
    return path


def read_voc(text: str, origin: str) -> tuple[str, int, int, np.ndarray]:
    """(image file name, width, height, (N, 4) boxes) of a Pascal VOC annotation."""
    try:
        root = ET.fromstring(text)
        size = root.find("size")
        width, height = int(size.findtext("width")), int(size.findtext("height"))
        boxes = [
            [float(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            for obj in root.iter("object")
        ]
        name = root.findtext("filename")
    except (ET.ParseError, AttributeError, TypeError, ValueError) as exc:
        raise CaffeEvoError(f"{origin}: not a Pascal VOC annotation ({exc})") from None
    return name, width, height, check_boxes(np.asarray(boxes).reshape(-1, 4), width, height, origin)


def tiles(image: np.ndarray, boxes: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    height, width = image.shape[:2]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for y in range(0, height, size):
        for x in range(0, width, size):
            clipped = np.clip(boxes - [x, y, x, y], 0, size)
            clipped[:, 2] = np.minimum(clipped[:, 2], width - x)
            clipped[:, 3] = np.minimum(clipped[:, 3], height - y)
            inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
            yield image[y : y + size, x : x + size], clipped[inside >= 0.5 * area]


def convert_trees(wheel: Path, out_dir: Path, tile: int = 128) -> dict:
    if tile % 16 or tile < 64:
        raise CaffeEvoError(f"--tile must be a multiple of 16 and at least 64, got {tile}")
    params = GroundTruthParams(image_width=tile, image_height=tile)
    with zipfile.ZipFile(wheel) as archive:
        images = {}
        for stem in (s for stems in SPLITS.values() for s in stems):
            xml = f"deepforest/data/{stem}.xml"
            name, width, height, boxes = read_voc(archive.read(xml).decode(), f"{wheel}:{xml}")
            data = np.frombuffer(archive.read(f"deepforest/data/{name}"), np.uint8)
            image = cv2.imdecode(data, cv2.IMREAD_COLOR)
            if image is None or image.shape[:2] != (height, width):
                raise CaffeEvoError(f"{wheel}:deepforest/data/{name}: does not decode to {width}x{height}")
            images[stem] = (image, boxes)

    def split(stems: tuple[str, ...]):
        for stem in stems:
            for piece, boxes in tiles(*images[stem], tile):
                yield fit_image(piece, boxes, params, f"{stem} tile"), boxes

    info = {
        "dataset": "trees",
        "source": f"PyPI deepforest==2.1.0 ({WHEEL}, sha256 {WHEEL_SHA256}), deepforest/data/",
        "images": SPLITS,
        "tile": tile,
    }
    return write_detection_dataset(
        out_dir, {name: split(stems) for name, stems in SPLITS.items()}, params, info
    )
