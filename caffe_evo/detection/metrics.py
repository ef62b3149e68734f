"""Precision, recall and average precision of detections pooled over a whole split.

Matching is PASCAL VOC's: all detections of the split, most confident first, each take the unmatched
ground-truth box of their image with the highest IoU if that reaches ``iou_threshold`` (true positive),
else count as false positives. Precision and recall are those of every detection the clustering kept;
average precision is the area under the precision envelope over recall (VOC 2010's all-point AP; with one
class it is also the mAP). DetectNet's own ``mean_ap.py`` uses IoU 0.7 (the default here) but matches in
ground-truth order and reports precision x recall as "mAP"; both differ from VOC's definitions, which are
what is computed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one box (4,) with each of ``others`` (N, 4), corners x1, y1, x2, y2."""
    others = np.asarray(others, np.float64).reshape(-1, 4)
    w = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = w * h
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    union = (box[2] - box[0]) * (box[3] - box[1]) + areas - inter
    return np.where(inter > 0, inter / np.where(union > 0, union, 1), 0.0)


@dataclass
class DetectionScore:
    precision: float
    recall: float
    average_precision: float
    true_positives: int
    detections: int
    ground_truth: int


def score(images: list[tuple[np.ndarray, np.ndarray]], iou_threshold: float = 0.7) -> DetectionScore:
    """Score ``(detections (D, 5), ground truth (G, 4))`` pairs, one per image, pooled."""
    ranked = sorted(
        (
            (float(det[4]), i, det[:4])
            for i, (dets, _) in enumerate(images)
            for det in np.reshape(dets, (-1, 5))
        ),
        key=lambda item: -item[0],
    )
    truth = [np.asarray(gt, np.float64).reshape(-1, 4) for _, gt in images]
    taken = [np.zeros(len(gt), bool) for gt in truth]
    hits = np.zeros(len(ranked), bool)
    for k, (_, i, box) in enumerate(ranked):
        if not len(truth[i]):
            continue
        overlaps = np.where(taken[i], -1.0, iou(box, truth[i]))
        best = int(np.argmax(overlaps))
        if overlaps[best] >= iou_threshold:
            taken[i][best] = hits[k] = True
    n_truth = sum(len(gt) for gt in truth)
    tp = int(hits.sum())
    return DetectionScore(
        precision=tp / len(ranked) if ranked else 0.0,
        recall=tp / n_truth if n_truth else 0.0,
        average_precision=average_precision(hits, n_truth),
        true_positives=tp,
        detections=len(ranked),
        ground_truth=n_truth,
    )


def average_precision(hits: np.ndarray, n_truth: int) -> float:
    """VOC all-point AP of ranked detections (``hits``: True where a detection is a true positive)."""
    if n_truth == 0 or len(hits) == 0:
        return 0.0
    tp = np.cumsum(hits)
    recall = np.concatenate([[0.0], tp / n_truth, [1.0]])
    precision = np.concatenate([[0.0], tp / np.arange(1, len(hits) + 1), [0.0]])
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * envelope[steps + 1]))
