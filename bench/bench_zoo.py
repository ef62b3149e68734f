"""The zoo recipes (AlexNet, ResNet-20/56, the STL-10 net) evolved on their Fashion-MNIST stand-ins.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python bench/bench_zoo.py --out runs/zoo alexnet-cifar10 \
        [--generations 6] [--ancestor-iters 40] [--iters-per-generation 20] [--bn-batches 10] \
        [--val-images 1000] [--test-images 2000] [--seed 0]

CIFAR-10 and STL-10 are not on these machines, so every figure is the stand-in's (``--stand-in``), never
the dataset's. The CPU here trains these nets at seconds per iteration, so the run is short: an
undertrained ancestor, a few solver iterations per generation, population 1, and evaluation on a prefix
of the validation and test sets. The recipe is copied to ``OUT/recipes/NAME`` with only its solver's
``test_iter`` changed to read that many images; everything else is the recipe's own ``evolution.yaml``.
A second call with a larger ``--generations`` resumes the lineage. Prints the per-generation table:
synapses, clusters, efficiencies, accuracies, compact synapses and multiply-adds, pycaffe batch-1 latency,
and the BatchNorm re-estimation time.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from caffe_evo import lineage, masking
from caffe_evo.caffe_env import caffe_pb2
from caffe_evo.evolution import read_params
from caffe_evo.recipe import SOLVER_FILE, parse_prototxt, to_prototxt
from caffe_evo.training import WEIGHTS_FILE

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ("alexnet-cifar10", "resnet20-cifar10", "resnet56-cifar10", "stl10")


def short_eval_copy(name: str, dest: Path, images: tuple[int, int]) -> Path:
    """The recipe copied to ``dest`` with test_iter reading ``images`` (val, test) at its test batch size."""
    if dest.exists():
        return dest
    shutil.copytree(ROOT / "prototxt" / name, dest)
    solver = parse_prototxt(dest / SOLVER_FILE, caffe_pb2().SolverParameter())
    net = parse_prototxt(dest / solver.net, caffe_pb2().NetParameter())
    batch = {}
    for layer in net.layer:
        for rule in layer.include:
            if rule.stage and layer.type == "Data":
                batch[rule.stage[0]] = layer.data_param.batch_size
    for i, state in enumerate(solver.test_state):
        solver.test_iter[i] = math.ceil(images[i] / batch[state.stage[0]])
    (dest / SOLVER_FILE).write_text(to_prototxt(solver))
    return dest


def compact_synapses(gen_dir: Path) -> int:
    """The non-zero weights that the compact network keeps in the masked layers."""
    compact = gen_dir / "compact"
    params = read_params(compact / "deploy.prototxt", compact / WEIGHTS_FILE)
    layers = masking.load(gen_dir / lineage.MASKS_FILE)
    return sum(int(np.count_nonzero(params[name][0])) for name in layers if name in params)


def table(run: Path) -> str:
    history = lineage.generations(run)
    head = (
        "| gen | synapses | synaptic eff. | clusters | cluster eff. | val | test | compact synapses "
        "| compact MACs | pycaffe batch-1 ms (full / compact) | BN re-est. s | train s |"
    )
    lines = [head, "|" + "---|" * 12]
    for g, m in enumerate(history):
        cost = m.get("cost") or {}
        full, small = cost.get("full", {}), cost.get("compact", {})
        ms = [net.get("latency_ms_batch1", float("nan")) for net in (full, small)]
        bn = m.get("batchnorm_reestimation")
        lines.append(
            f"| {g} | {m['synapses']:,} | {m['synaptic_efficiency']:.2f}x | {m['clusters']:,} "
            f"| {m['cluster_efficiency']:.2f}x | {100 * m['val_accuracy']:.2f}% "
            f"| {100 * m['test_accuracy']:.2f}% | {compact_synapses(lineage.generation_dir(run, g)):,} "
            f"| {small.get('macs', 0) / 1e6:.1f}M | {ms[0]:.2f} / {ms[1]:.2f} "
            f"| {bn['seconds'] if bn else '-'} | {m['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", choices=RECIPES)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--ancestor-iters", type=int, default=40)
    parser.add_argument("--iters-per-generation", type=int, default=20)
    parser.add_argument("--bn-batches", type=int, default=10)
    parser.add_argument("--val-images", type=int, default=1000)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--max-accuracy-drop", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    recipe = short_eval_copy(
        args.recipe, args.out / "recipes" / args.recipe, (args.val_images, args.test_images)
    )
    run = args.out / f"{args.recipe}-evo"
    cli = [sys.executable, "-m", "caffe_evo.cli", "evolve"]
    if (run / "run.json").is_file():
        command = [*cli, "--resume", str(run), "--generations", str(args.generations)]
    else:
        command = [
            *cli, "--recipe", str(recipe),
            "--config", str(ROOT / "prototxt" / args.recipe / "evolution.yaml"),
            "--stand-in", "--out", str(run), "--generations", str(args.generations), "--population", "1",
            "--ancestor-iters", str(args.ancestor_iters), "--iters-per-generation",
            str(args.iters_per_generation), "--bn-batches", str(args.bn_batches),
            "--max-accuracy-drop", str(args.max_accuracy_drop), "--seed", str(args.seed),
        ]  # fmt: skip
    started = time.perf_counter()
    env = {**os.environ, "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1")}
    subprocess.run(command, check=True, env=env)
    print(f"{args.recipe} ({run}): wall {time.perf_counter() - started:.0f} s, load {os.getloadavg()[0]:.1f}")
    print(table(run))


if __name__ == "__main__":
    main()
