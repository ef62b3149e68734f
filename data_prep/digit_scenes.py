"""Digit scenes: a stand-in detection set composed from real MNIST digits (the objects) and real
Fashion-MNIST items (distractors), at varied scale, colour and position on a textured background.

A stand-in, not KITTI or Parse-27k: it exists so that the detection pipeline trains and evolves here.
Training scenes use only the MNIST/Fashion-MNIST ``train_noval`` images, validation scenes only their
``val`` images and test scenes only the official test images, so no digit is seen in two splits.
Each scene: 1-``max_digits`` digits (box = the tight box of the scaled digit's ink), non-overlapping,
and up to 2 distractors that overlap nothing either (the first digit always fits); everything is drawn
from one seeded generator.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from caffe_evo.detection.groundtruth import GroundTruthParams
from caffe_evo.errors import CaffeEvoError
from data_prep.detection_lmdb import write_detection_dataset
from data_prep.lmdb_io import iter_datum_lmdb

SOURCE_SPLITS = {"train": "train_noval", "val": "val", "test": "test"}
DIGIT_SIZES = (24, 48)  # pixel height of a digit's 28x28 frame, uniform in this range
MAX_DIGITS = 4


def _load(folder: Path, split: str) -> np.ndarray:
    path = Path(folder) / f"{split}_lmdb"
    if not path.is_dir():
        raise CaffeEvoError(f"{path}: not found (prepare it with `caffe-evo data {Path(folder).name}`)")
    return np.stack([image[0] for _, image, _ in iter_datum_lmdb(path)])


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-frequency colour texture plus fine noise, float HxWx3 in [0, 255]."""
    coarse = rng.uniform(0, 160, (size // 16, size // 16, 3)).astype(np.float32)
    smooth = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(smooth + rng.normal(0, 12, (size, size, 3)), 0, 255)


def _place(rng, occupied: list, side: int, size: int) -> tuple[int, int] | None:
    for _ in range(30):
        x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
        if all(x + side <= a or a + s <= x or y + side <= b or b + s <= y for a, b, s in occupied):
            occupied.append((x, y, side))
            return x, y
    return None


def _paste(canvas: np.ndarray, item: np.ndarray, x: int, y: int, side: int, colour: np.ndarray) -> np.ndarray:
    """Alpha-blend a grey 28x28 item scaled to side x side; returns the scaled alpha."""
    alpha = cv2.resize(item.astype(np.float32) / 255, (side, side), interpolation=cv2.INTER_LINEAR)
    alpha = np.clip(alpha, 0, 1)[..., None]
    region = canvas[y : y + side, x : x + side]
    region[...] = region * (1 - alpha) + colour * alpha
    return alpha[..., 0]


def scene(rng: np.random.Generator, digits: np.ndarray, items: np.ndarray, size: int):
    """One HxWx3 uint8 scene and its (N, 4) digit boxes."""
    canvas = _background(rng, size)
    occupied: list = []
    boxes = []
    for _ in range(int(rng.integers(1, MAX_DIGITS + 1))):
        side = int(rng.integers(*DIGIT_SIZES))
        if (spot := _place(rng, occupied, side, size)) is None:
            continue
        alpha = _paste(canvas, digits[rng.integers(len(digits))], *spot, side, rng.uniform(160, 255, 3))
        ys, xs = np.nonzero(alpha > 0.25)
        x, y = spot
        boxes.append([x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1])
    # Distractors after the digits, so that the first digit always finds room.
    for _ in range(int(rng.integers(0, 3))):
        side = int(rng.integers(*DIGIT_SIZES))
        if (spot := _place(rng, occupied, side, size)) is not None:
            _paste(canvas, items[rng.integers(len(items))], *spot, side, rng.uniform(60, 255, 3))
    return np.round(canvas).astype(np.uint8), np.asarray(boxes, np.float64).reshape(-1, 4)


def convert_digit_scenes(
    mnist: Path, fashion: Path, out_dir: Path, counts: dict[str, int], size: int = 128, seed: int = 0
) -> dict:
    """Compose ``counts[split]`` scenes per split into the detection LMDBs under ``out_dir``."""
    if size % 16 or size < 64:
        raise CaffeEvoError(f"--scene-size must be a multiple of 16 and at least 64, got {size}")
    if any(n < 1 for n in counts.values()):
        raise CaffeEvoError(f"scene counts must be positive, got {counts}")
    params = GroundTruthParams(image_width=size, image_height=size)
    streams = np.random.SeedSequence(seed).spawn(len(SOURCE_SPLITS))

    def split(name: str, stream: np.random.SeedSequence):
        rng = np.random.default_rng(stream)
        digits, items = _load(mnist, SOURCE_SPLITS[name]), _load(fashion, SOURCE_SPLITS[name])
        for _ in range(counts[name]):
            yield scene(rng, digits, items, size)

    splits = {name: split(name, stream) for name, stream in zip(SOURCE_SPLITS, streams, strict=False)}
    info = {
        "dataset": "digit-scenes",
        "stand_in": "composed from MNIST digits and Fashion-MNIST distractors; not KITTI or Parse-27k",
        "sources": {"mnist": str(mnist), "fashion-mnist": str(fashion)},
        "source_splits": SOURCE_SPLITS,
        "seed": seed,
        "image_size": [size, size],
    }
    return write_detection_dataset(out_dir, splits, params, info)
