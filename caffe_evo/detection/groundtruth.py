"""DetectNet's ground truth: the coverage and bounding-box maps at the network's output stride.

The definitions follow NVIDIA's Caffe fork (branch caffe-0.17, ``src/caffe/util/
detectnet_coverage_rectangular.cpp``, the ``DetectNetTransformation`` layer), which BVLC Caffe lacks, so
the maps are computed here, during data preparation, and read by Caffe from an LMDB of float ``Datum``
records in lockstep with the images. Per box (x1, y1, x2, y2 in pixels):

- the coverage region is centred on the box, ``scale_cvg`` times its size, but (GRIDBOX_MIN) no shorter
  than ``min_cvg_len`` pixels and no larger than the box itself;
- every grid cell (``stride`` pixels square) that the region overlaps gets coverage 1 (RECTANGULAR) and,
  as targets, the box corners relative to the cell's top-left corner, ``1/w`` and ``1/h`` of the box
  (the network's bbox loss is normalised by object size) and ``obj_norm`` = cell area / region area
  (so that a large object does not outweigh a small one); a later box overwrites an earlier one;
- NVIDIA's ``crop_bboxes`` (clip boxes to the image) is moot: the readers refuse a box outside its image.

The 8 channels are in NVIDIA's order, so the recipes' Slice/Concat/Eltwise label layers are DetectNet's:
foreground, x1, y1, x2, y2, 1/w, 1/h, obj_norm; then one coverage channel (one class).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from caffe_evo.errors import CaffeEvoError

LABEL_CHANNELS = 9  # foreground, 4 corners, 2 inverse sizes, obj_norm, coverage (one class)
_EPS = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class GroundTruthParams:
    """DetectNet's ``detectnet_groundtruth_param`` (values of examples/kitti/detectnet_network.prototxt)."""

    image_width: int
    image_height: int
    stride: int = 16
    scale_cvg: float = 0.4
    min_cvg_len: float = 20.0
    obj_norm: bool = True

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of the output maps."""
        return self.image_height // self.stride, self.image_width // self.stride

    def to_json(self) -> dict:
        return asdict(self)


def coverage_region(box: np.ndarray, params: GroundTruthParams) -> tuple[float, float, float, float]:
    """The GRIDBOX_MIN coverage rectangle of one box: centred, shrunk by scale_cvg, >= min_cvg_len."""
    x1, y1, x2, y2 = (float(v) for v in box)
    width, height = x2 - x1, y2 - y1
    cw = min(width, max(params.min_cvg_len, width * params.scale_cvg))
    ch = min(height, max(params.min_cvg_len, height * params.scale_cvg))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return cx - cw / 2, cy - ch / 2, cx + cw / 2, cy + ch / 2


def label_maps(boxes: np.ndarray, params: GroundTruthParams) -> np.ndarray:
    """The (9, rows, cols) float32 label of one image from its (N, 4) boxes."""
    rows, cols = params.grid
    label = np.zeros((LABEL_CHANNELS, rows, cols), np.float32)
    s = params.stride
    for box in np.asarray(boxes, np.float64).reshape(-1, 4):
        x1, y1, x2, y2 = box
        if (x2 - x1) * (y2 - y1) < _EPS:
            continue  # not in the scene at all
        rx1, ry1, rx2, ry2 = coverage_region(box, params)
        norm = max(0.0 if params.obj_norm else 1.0, s * s / ((rx2 - rx1) * (ry2 - ry1)))
        # Every cell the region touches, floor(tl / stride) to ceil(br / stride), inside the grid.
        for gy in range(max(0, math.floor(ry1 / s)), min(rows, math.ceil(ry2 / s))):
            for gx in range(max(0, math.floor(rx1 / s)), min(cols, math.ceil(rx2 / s))):
                cell_x, cell_y = gx * s, gy * s
                overlap_w = min(rx2, cell_x + s) - max(rx1, cell_x)
                overlap_h = min(ry2, cell_y + s) - max(ry1, cell_y)
                if overlap_w <= 0 or overlap_h <= 0 or overlap_w * overlap_h / (s * s) <= _EPS:
                    continue
                label[:, gy, gx] = (
                    1.0,
                    x1 - cell_x,
                    y1 - cell_y,
                    x2 - cell_x,
                    y2 - cell_y,
                    1.0 / (x2 - x1),
                    1.0 / (y2 - y1),
                    norm,
                    1.0,
                )
    return label


def boxes_from_labels(coverage: np.ndarray, bbox: np.ndarray, stride: int) -> np.ndarray:
    """The distinct ground-truth boxes (M, 4) encoded in a coverage map (rows, cols) and bbox map (4, ...).

    As DetectNet's ClusterGroundtruth: every covered cell's corners back in image coordinates, duplicates
    removed. A box whose every cell a later box overwrote is not recoverable (nor is it in DetectNet).
    """
    ys, xs = np.nonzero(coverage > 0)
    corners = bbox[:, ys, xs].T + np.stack([xs, ys, xs, ys], axis=1) * stride
    # Rounded to 1/64 pixel: one box seen from different cells differs only by float32 rounding.
    return np.unique(np.round(corners.astype(np.float64) * 64) / 64, axis=0).reshape(-1, 4)


def check_boxes(boxes: np.ndarray, width: int, height: int, origin: str) -> np.ndarray:
    """Boxes (N, 4) inside a width x height image with positive size, else a clear error naming ``origin``."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    for x1, y1, x2, y2 in boxes:
        if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
            raise CaffeEvoError(
                f"{origin}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) is empty or outside "
                f"the {width}x{height} image"
            )
    return boxes
