"""The detection task: how a DetectNet recipe's test nets are evaluated.

A recipe is a detection recipe when its folder holds ``detection.yaml``: the output blobs, the label blobs,
the clustering parameters and the IoU threshold. Evaluation runs the test net over its whole split once
(the split's records / batch size passes, in place of ``test_iter``), clusters each image's coverage and
bbox maps into detections, recovers the ground truth from the label maps, and scores the detections
pooled over the split (:mod:`caffe_evo.detection.metrics`): per-batch means of precision or AP would be
wrong. The losses are averaged over the batches as for any net. Metric keys: ``precision``, ``recall``,
``mAP``, and the counts ``detections`` and ``ground_truth``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from caffe_evo.detection.cluster import ClusterParams, cluster
from caffe_evo.detection.groundtruth import boxes_from_labels
from caffe_evo.detection.metrics import score
from caffe_evo.errors import CaffeEvoError

TASK_FILE = "detection.yaml"


@dataclass(frozen=True)
class DetectionTask:
    stride: int = 16
    coverage: str = "coverage"
    bboxes: str = "bboxes"
    coverage_label: str = "coverage-label"
    bbox_label: str = "bbox-label"
    iou_threshold: float = 0.7
    cluster: ClusterParams = field(default_factory=ClusterParams)

    @classmethod
    def load(cls, recipe_folder: Path) -> DetectionTask | None:
        """The recipe's detection task, or None for a classifier recipe (no ``detection.yaml``)."""
        path = Path(recipe_folder) / TASK_FILE
        if not path.is_file():
            return None
        try:
            data = yaml.safe_load(path.read_text()) or {}
            data["cluster"] = ClusterParams(**data.get("cluster", {}))
            return cls(**data)
        except (yaml.YAMLError, TypeError, AttributeError) as exc:
            raise CaffeEvoError(f"{path}: not a valid detection task ({exc})") from None

    def check_heads(self, recipe: Any) -> None:
        """The heads must be at the task's stride, and the datasets' ground truth at that stride and size.

        Caffe itself would only stop at the first Eltwise of maps of different sizes; this says why.
        """
        from caffe_evo.caffe_env import check_nets_build, load_caffe

        deploy = recipe.folder / "deploy.prototxt"  # no data sources: the recipe's own file
        check_nets_build([(deploy, "TEST")], f"recipe {recipe.name}")  # a broken net: one line, not abort
        caffe = load_caffe()
        net = caffe.Net(str(deploy), caffe.TEST)
        size = net.blobs[net.inputs[0]].data.shape[2:]
        for head in (self.coverage, self.bboxes):
            if head not in net.blobs:
                raise CaffeEvoError(f"{deploy}: no output blob '{head}' ({recipe.folder / TASK_FILE})")
            grid = net.blobs[head].data.shape[2:]
            if tuple(g * self.stride for g in grid) != tuple(size):
                raise CaffeEvoError(
                    f"{deploy}: head '{head}' is {grid[0]}x{grid[1]} for a {size[0]}x{size[1]} input, "
                    f"not stride {self.stride}, the ground truth's ({recipe.folder / TASK_FILE})"
                )
        for layer in recipe.train_val.layer:
            info_path = Path(layer.data_param.source).parent / "info.json"
            if layer.type != "Data" or not layer.data_param.source.endswith("_labels_lmdb"):
                continue
            truth = json.loads(info_path.read_text()).get("groundtruth", {}) if info_path.is_file() else {}
            made = (truth.get("stride"), truth.get("image_height"), truth.get("image_width"))
            if made != (self.stride, *size):
                raise CaffeEvoError(
                    f"{info_path}: ground truth made at stride {made[0]} for {made[2]}x{made[1]} images; "
                    f"recipe {recipe.name} needs stride {self.stride} for {size[1]}x{size[0]}"
                )

    def passes(self, recipe: Any) -> list[int]:
        """Per test net, the forward passes that see each image of its split exactly once.

        This replaces the solver's ``test_iter``: pooled scores need the whole split, and a partial last
        batch would wrap around to the split's first images and misalign every later evaluation.
        """
        from data_prep.lmdb_io import count_records

        passes = []
        for state in recipe.solver.test_state:
            stages = set(state.stage)
            sizes = {
                (Path(layer.data_param.source), layer.data_param.batch_size)
                for layer in recipe.train_val.layer
                if layer.type == "Data"
                and any(rule.phase == 1 and set(rule.stage) <= stages for rule in layer.include)
            }
            records = {count_records(source) for source, _ in sizes}
            batches = {batch for _, batch in sizes}
            if len(records) != 1 or len(batches) != 1 or next(iter(records)) % next(iter(batches)):
                raise CaffeEvoError(
                    f"recipe {recipe.name}: test net {'/'.join(state.stage)} needs one image and one label "
                    f"LMDB of the same length, read with one batch size that divides it; got "
                    f"{sorted(str(s) for s, _ in sizes)} with {sorted(records)} records, "
                    f"batch {sorted(batches)}"
                )
            passes.append(next(iter(records)) // next(iter(batches)))
        return passes

    def evaluate(self, net: Any, iterations: int) -> dict[str, float]:
        """One pass of ``net`` over its split: mean losses, pooled precision, recall and mAP."""
        sums: dict[str, float] = {}
        images: list[tuple[np.ndarray, np.ndarray]] = []
        for _ in range(iterations):
            outputs = net.forward()
            for name, value in outputs.items():
                if np.size(value) == 1:
                    sums[name] = sums.get(name, 0.0) + float(np.mean(value))
            coverage, bboxes = net.blobs[self.coverage].data, net.blobs[self.bboxes].data
            truth, truth_boxes = net.blobs[self.coverage_label].data, net.blobs[self.bbox_label].data
            if coverage.shape != truth.shape or bboxes.shape != truth_boxes.shape:
                raise CaffeEvoError(
                    f"the net's heads {coverage.shape[1:]} and {bboxes.shape[1:]} do not match the ground "
                    f"truth {truth.shape[1:]} and {truth_boxes.shape[1:]} (stride {self.stride})"
                )
            for i in range(coverage.shape[0]):
                found = cluster(coverage[i, 0], bboxes[i], self.stride, self.cluster)
                images.append((found, boxes_from_labels(truth[i, 0], truth_boxes[i], self.stride)))
        result = score(images, self.iou_threshold)
        return {
            **{name: total / iterations for name, total in sums.items()},
            "precision": result.precision,
            "recall": result.recall,
            "mAP": result.average_precision,
            "detections": float(result.detections),
            "ground_truth": float(result.ground_truth),
        }
