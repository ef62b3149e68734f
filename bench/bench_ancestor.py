"""Benchmark: train the LeNet-5 ancestor with the recipe's default solver and print its figures.

    .venv/bin/python bench/bench_ancestor.py [--out runs/bench-ancestor] [--seed 1701]

Prints test accuracy on the official 10,000 MNIST test images, wall time and iterations per second.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path

from caffe_evo.recipe import Recipe
from caffe_evo.training import TrainOptions, train

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-ancestor")
    parser.add_argument("--seed", type=int, default=None, help="default: the recipe's random_seed")
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    recipe = Recipe.load(ROOT / "prototxt" / "lenet5", ROOT / "data")
    started = time.perf_counter()
    metrics = train(recipe, args.out, TrainOptions(seed=args.seed, progress=False))
    wall = time.perf_counter() - started
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"iterations: {metrics['iterations']} (batch 64, seed {metrics['seed']})")
    print(f"test accuracy (official 10,000): {100 * metrics['test_accuracy']:.2f}%")
    print(f"validation accuracy (5,000 held out of train): {100 * metrics['val_accuracy']:.2f}%")
    print(
        f"training wall time: {metrics['train_seconds']:.1f} s, {metrics['iterations_per_second']:.1f} it/s"
    )
    print(f"whole run incl. net set-up, testing and writing: {wall:.1f} s")


if __name__ == "__main__":
    main()
