"""DetectNet ground truth, clustering and scoring against hand-computed cases (no Caffe needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from caffe_evo.detection.cluster import ClusterParams, cluster
from caffe_evo.detection.groundtruth import GroundTruthParams, boxes_from_labels, check_boxes, label_maps
from caffe_evo.detection.metrics import iou, score
from caffe_evo.errors import CaffeEvoError

PARAMS = GroundTruthParams(image_width=64, image_height=64)  # stride 16, scale_cvg 0.4, min_cvg_len 20


def test_two_box_label_maps_by_hand():
    # A: 32x20 at (4, 4); coverage region 20x20 (min_cvg_len wins over 0.4 x size) centred at (20, 14):
    # (10, 4)-(30, 24), touching cells x 0-1, y 0-1. B: 24x28 at (40, 36); region (42, 40)-(62, 60):
    # cells 2-3.
    boxes = np.array([[4, 4, 36, 24], [40, 36, 64, 64]], float)
    label = label_maps(boxes, PARAMS)
    assert label.shape == (9, 4, 4)
    covered = np.zeros((4, 4), bool)
    covered[0:2, 0:2] = covered[2:4, 2:4] = True
    for channel in (0, 8):  # foreground and coverage
        np.testing.assert_array_equal(label[channel], covered.astype(np.float32))
    assert not label[:, ~covered].any()
    # Corners relative to each cell's top-left corner.
    np.testing.assert_allclose(label[1:5, 0, 0], [4, 4, 36, 24])
    np.testing.assert_allclose(label[1:5, 0, 1], [-12, 4, 20, 24])  # row 0, column 1: x - 16
    np.testing.assert_allclose(label[1:5, 1, 1], [-12, -12, 20, 8])
    np.testing.assert_allclose(label[1:5, 2, 2], [8, 4, 32, 32])
    np.testing.assert_allclose(label[1:5, 3, 3], [-8, -12, 16, 16])
    np.testing.assert_allclose(label[5:7, 0, 0], [1 / 32, 1 / 20])
    np.testing.assert_allclose(label[5:7, 3, 2], [1 / 24, 1 / 28])
    # obj_norm: cell area / coverage-region area = 256 / 400.
    np.testing.assert_allclose(label[7][covered], 0.64)
    recovered = boxes_from_labels(label[8], label[1:5], 16)
    np.testing.assert_allclose(recovered, boxes)


def test_large_box_coverage_is_scale_cvg_and_later_box_overwrites():
    params = GroundTruthParams(image_width=128, image_height=64)
    # 100x60 box: region 40x24 (0.4 x size) centred at (50, 30): (30, 18)-(70, 42), cells x 1-4, y 1-2.
    label = label_maps(np.array([[0, 0, 100, 60]]), params)
    np.testing.assert_array_equal(np.argwhere(label[8] > 0)[[0, -1]], [[1, 1], [2, 4]])
    np.testing.assert_allclose(label[7, 1, 1], 256 / (40 * 24))
    both = label_maps(np.array([[0, 0, 100, 60], [60, 20, 90, 50]]), params)
    # The second box's region (65, 25)-(85, 45) takes cells 4-5 of rows 1-2 from the first.
    np.testing.assert_allclose(both[1:5, 1, 4], [60 - 64, 20 - 16, 90 - 64, 50 - 16])
    np.testing.assert_allclose(both[1:5, 1, 3], [0 - 48, 0 - 16, 100 - 48, 60 - 16])


def test_bad_boxes_are_one_clear_error():
    with pytest.raises(CaffeEvoError, match=r"labels/7.txt:3: box .* outside the 64x64 image"):
        check_boxes(np.array([[10, 10, 70, 20]]), 64, 64, "labels/7.txt:3")
    with pytest.raises(CaffeEvoError, match="empty"):
        check_boxes(np.array([[10, 10, 10, 20]]), 64, 64, "x")


def test_clustering_by_hand():
    coverage = np.zeros((4, 4))
    bbox = np.zeros((4, 4, 4))
    # Three neighbouring cells propose nearly the same box (image coordinates (10, 8)-(42, 40) +- 1 pixel),
    # a fourth cell proposes one far away, a fifth cell is below the coverage threshold.
    for (y, x), box in {
        (0, 0): (10, 8, 42, 40),
        (0, 1): (11, 8, 43, 40),
        (1, 0): (9, 8, 41, 40),
        (3, 3): (50, 50, 60, 60),
    }.items():
        coverage[y, x] = 0.9
        bbox[:, y, x] = np.array(box) - [16 * x, 16 * y, 16 * x, 16 * y]
    coverage[2, 2] = 0.5
    found = cluster(coverage, bbox, 16, ClusterParams(coverage_threshold=0.6, rect_threshold=1, rect_eps=0.2))
    # The isolated proposal has no partner (a cluster needs more than rect_threshold members); the three
    # average to (10, 8)-(42, 40) with confidence log(3).
    np.testing.assert_allclose(found, [[10, 8, 42, 40, math.log(3)]])
    assert cluster(coverage, bbox, 16, ClusterParams(0.6, 1, 0.2, min_height=33)).shape == (0, 5)
    assert cluster(coverage, bbox, 16, ClusterParams(0.6, 3, 0.2)).shape == (0, 5)


def test_iou_and_average_precision_by_hand():
    assert iou(np.array([0, 0, 10, 10.0]), np.array([[5, 0, 15, 10]]))[0] == pytest.approx(50 / 150)
    images = [
        (
            np.array([[0, 0, 10, 10, 0.9], [21, 21, 31, 31, 0.8], [0, 0, 10, 10, 0.7]]),
            np.array([[0, 0, 10, 10], [20, 20, 30, 30]]),
        ),
        (np.array([[0, 0, 10, 9, 0.6]]), np.array([[0, 0, 10, 10]])),
        (np.array([[5, 5, 9, 9, 0.1]]), np.zeros((0, 4))),
    ]
    # IoU 0.7: the shifted box (IoU 81/119) and the duplicate are false positives; ranked hits T F F T F.
    strict = score(images, 0.7)
    assert (strict.true_positives, strict.detections, strict.ground_truth) == (2, 5, 3)
    assert strict.precision == pytest.approx(2 / 5) and strict.recall == pytest.approx(2 / 3)
    assert strict.average_precision == pytest.approx(1 / 3 * 1 + 1 / 3 * 0.5)
    # IoU 0.5: hits T T F T F, recall 1, envelope 1, 1, 0.75.
    loose = score(images, 0.5)
    assert loose.precision == pytest.approx(3 / 5) and loose.recall == 1.0
    assert loose.average_precision == pytest.approx(1 / 3 + 1 / 3 + 0.75 / 3)
    assert score([(np.zeros((0, 5)), np.array([[0, 0, 1, 1]]))]).average_precision == 0.0
