"""Detection datasets as Caffe reads them: an image LMDB and a DetectNet label LMDB per split, in lockstep.

``<split>_images_lmdb`` holds 3xHxW uint8 BGR ``Datum`` records; ``<split>_labels_lmdb`` holds, under the
same ``%08d`` keys, float ``Datum`` records of DetectNet's 9-channel label at the output stride
(:func:`caffe_evo.detection.groundtruth.label_maps`). Two ``Data`` layers with the same batch size read
them in the same order (Caffe's Data layer never shuffles), as DIGITS' DetectNet recipes do.
``info.json`` records the ground-truth parameters, which the detection recipes check against their own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import cv2
import lmdb
import numpy as np

from caffe_evo.atomic import atomic_path
from caffe_evo.detection.groundtruth import GroundTruthParams, check_boxes, label_maps
from caffe_evo.errors import CaffeEvoError
from data_prep.lmdb_io import INFO_FILE

_COMMIT_EVERY = 200


def read_image(path: Path) -> np.ndarray:
    """An image file as HxWx3 uint8 BGR; one clear error if it does not decode."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise CaffeEvoError(f"{path}: not a readable image")
    return image


def fit_image(image: np.ndarray, boxes: np.ndarray, params: GroundTruthParams, origin: str) -> np.ndarray:
    """Pad an HxWx3 image at its bottom and right to the recipe's size (DIGITS' padding); never crop."""
    height, width = image.shape[:2]
    if height > params.image_height or width > params.image_width:
        raise CaffeEvoError(
            f"{origin}: image is {width}x{height}, larger than the dataset's "
            f"{params.image_width}x{params.image_height} (choose a larger --image-size)"
        )
    check_boxes(boxes, width, height, origin)
    padded = np.zeros((params.image_height, params.image_width, 3), np.uint8)
    padded[:height, :width] = image
    return padded


def _write_split(tmp: Path, split: str, items: Iterable[tuple[np.ndarray, np.ndarray]], params) -> dict:
    from caffe_evo.caffe_env import caffe_pb2

    pb2 = caffe_pb2()
    envs = {}
    counts = {"images": 0, "boxes": 0}
    try:
        txns = {}
        for kind in ("images", "labels"):
            # The map grows on demand only in newer lmdb releases: size it for a large split up front.
            envs[kind] = lmdb.open(
                str(tmp / f"{split}_{kind}_lmdb"), map_size=1 << 36, subdir=True, lock=False
            )
            txns[kind] = envs[kind].begin(write=True)
        for image, boxes in items:
            key = b"%08d" % counts["images"]
            datum = pb2.Datum(channels=3, height=params.image_height, width=params.image_width)
            datum.data = np.ascontiguousarray(image.transpose(2, 0, 1)).tobytes()
            txns["images"].put(key, datum.SerializeToString())
            label = label_maps(boxes, params)
            datum = pb2.Datum(channels=label.shape[0], height=label.shape[1], width=label.shape[2])
            datum.float_data.extend(label.ravel().tolist())
            txns["labels"].put(key, datum.SerializeToString())
            counts["images"] += 1
            counts["boxes"] += len(boxes)
            if counts["images"] % _COMMIT_EVERY == 0:
                for kind in txns:
                    txns[kind].commit()
                    txns[kind] = envs[kind].begin(write=True)
        for txn in txns.values():
            txn.commit()
    finally:
        for env in envs.values():
            env.close()
    if counts["images"] == 0:
        raise CaffeEvoError(f"split {split}: no images")
    return counts


def write_detection_dataset(
    out_dir: Path,
    splits: dict[str, Iterable[tuple[np.ndarray, np.ndarray]]],
    params: GroundTruthParams,
    info: dict,
) -> dict:
    """Write every split's image and label LMDBs and ``info.json`` into ``out_dir``, atomically.

    ``splits`` maps a split name to (HxWx3 uint8 BGR image at the dataset's size, (N, 4) boxes) pairs;
    they are consumed lazily, so a bad file met late still leaves nothing behind.
    """
    with atomic_path(Path(out_dir), directory=True) as tmp:
        counts = {name: _write_split(tmp, name, items, params) for name, items in splits.items()}
        info = {
            **info,
            "records": {name: c["images"] for name, c in counts.items()},
            "boxes": {name: c["boxes"] for name, c in counts.items()},
            "groundtruth": params.to_json(),
        }
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info
