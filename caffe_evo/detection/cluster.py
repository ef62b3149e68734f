"""From DetectNet's output maps to detections: DIGITS' clustering (``ClusterDetections``).

As NVIDIA's ``python/caffe/layers/detectnet/clustering.py`` (caffe-0.17): every grid cell whose coverage
reaches ``coverage_threshold`` proposes the box its four bbox channels give (corners relative to the cell's
top-left corner); OpenCV's ``groupRectangles`` merges the proposals (a cluster needs more than
``rect_threshold`` members, rectangles are similar within ``rect_eps``); a cluster lower than
``min_height`` pixels is dropped, and its confidence is log(number of members). The KITTI recipe's values
(examples/kitti/detectnet_network.prototxt, ``param_str '1248, 352, 16, 0.6, 3, 0.02, 22, 1'``) are the
defaults. OpenCV 4's binding takes integer rectangles only, so proposals are rounded to whole pixels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class ClusterParams:
    coverage_threshold: float = 0.6
    rect_threshold: int = 3
    rect_eps: float = 0.02
    min_height: float = 22.0

    def to_json(self) -> dict:
        return asdict(self)


def proposals(coverage: np.ndarray, bbox: np.ndarray, stride: int, threshold: float) -> np.ndarray:
    """(P, 4) boxes x1, y1, x2, y2 of the cells with coverage >= threshold; coverage (rows, cols)."""
    ys, xs = np.nonzero(coverage >= threshold)
    return bbox[:, ys, xs].T.astype(np.float64) + np.stack([xs, ys, xs, ys], axis=1) * stride


def cluster(coverage: np.ndarray, bbox: np.ndarray, stride: int, params: ClusterParams) -> np.ndarray:
    """Detections (D, 5) of one image, x1, y1, x2, y2, confidence; coverage (rows, cols), bbox (4, ...)."""
    boxes = proposals(coverage, bbox, stride, params.coverage_threshold)
    if len(boxes) == 0:
        return np.zeros((0, 5))
    rects = [[round(x1), round(y1), round(x2 - x1), round(y2 - y1)] for x1, y1, x2, y2 in boxes]
    grouped, weights = cv2.groupRectangles(rects, params.rect_threshold, params.rect_eps)
    found = [
        [x, y, x + w, y + h, math.log(int(n))]
        for (x, y, w, h), n in zip(np.reshape(grouped, (-1, 4)), np.ravel(weights), strict=False)
        if h >= params.min_height
    ]
    return np.asarray(found, np.float64).reshape(-1, 5)
