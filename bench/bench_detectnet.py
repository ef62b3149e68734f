"""The full DetectNet recipe on this CPU: a few training iterations on files in KITTI's format.

KITTI itself cannot be downloaded here, so the files are synthetic (random-texture 1242x375 images, 1-3
"Car" boxes each, 15-column label lines, DIGITS' folder layout): they show that the 1248x384 GoogLeNet
recipe converts, trains and evaluates end to end, not how well it detects.

    OPENBLAS_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_detectnet.py --out runs/bench-detectnet
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np

from caffe_evo.detection.groundtruth import GroundTruthParams
from caffe_evo.recipe import Recipe
from caffe_evo.training import TrainOptions, train
from data_prep.kitti import convert_kitti

RECIPE = Path(__file__).resolve().parent.parent / "prototxt" / "detectnet"


def write_files(root: Path, counts: dict[str, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        for i in range(n):
            image = cv2.resize(rng.integers(0, 256, (24, 78, 3), dtype=np.uint8), (1242, 375))
            lines = []
            for _ in range(int(rng.integers(1, 4))):
                w, h = rng.uniform(40, 200), rng.uniform(30, 120)
                x, y = rng.uniform(0, 1242 - w), rng.uniform(0, 375 - h)
                cv2.rectangle(image, (int(x), int(y)), (int(x + w), int(y + h)), (40, 40, 200), -1)
                box = f"{x:.2f} {y:.2f} {x + w:.2f} {y + h:.2f}"
                lines.append(f"Car 0.00 0 0.00 {box} 1.5 1.6 3.9 1 1.7 20 0")
            cv2.imwrite(str(root / split / "images" / f"{i:06d}.png"), image)
            (root / split / "labels" / f"{i:06d}.txt").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--train", type=int, default=20)
    parser.add_argument("--val", type=int, default=2)
    args = parser.parse_args()
    args.out.mkdir(parents=True)
    write_files(args.out / "kitti-format", {"train": args.train, "val": args.val}, seed=0)
    started = time.perf_counter()
    convert_kitti(args.out / "kitti-format", args.out / "data" / "kitti", GroundTruthParams(1248, 384))
    print(f"converted in {time.perf_counter() - started:.1f} s")
    recipe = Recipe.load(RECIPE, args.out / "data")
    metrics = train(recipe, args.out / "train", TrainOptions(max_iter=args.iters, seed=1, progress=False))
    keys = ("iterations", "train_seconds", "iterations_per_second", "final_loss", "eval_seconds")
    scores = {k: v for k, v in metrics.items() if k.startswith("val_")}
    print(json.dumps({k: metrics[k] for k in keys} | scores))


if __name__ == "__main__":
    main()
