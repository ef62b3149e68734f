"""Batch-1 CPU speed of a lineage's ancestor against its compact offspring, measured side by side.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python bench/bench_lineage_speed.py runs/det13 --generations 0,7,13 \
        [--rounds 5] [--repeats 200]

A generation's `cost` is measured while the machine does whatever else it does, so speed-ups read off two
generations' metrics compare two moments. Here every network is loaded once and then timed in turns, round
after round (pycaffe and ONNX Runtime with one intra-op thread, batch 1): load drifts alike for all of them,
and the median over rounds of each round's median is printed with its speed-up over generation 0's full
network. Generation 0 is timed as its full network; every other generation as its `compact/` network.
Works for any task's lineage (classifier or detector).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from caffe_evo import lineage
from caffe_evo.caffe_env import caffe_pb2
from caffe_evo.deploy import onnx_export, runtime
from caffe_evo.deploy.measure import net_latency
from caffe_evo.recipe import parse_prototxt
from caffe_evo.training import WEIGHTS_FILE
from caffe_evo.weights import load_net


def networks(run: Path, generations: list[int]) -> dict[int, tuple[object, object]]:
    """Generation -> (pycaffe net, ONNX Runtime session) of its timed network."""
    loaded = {}
    for g in generations:
        folder = lineage.generation_dir(run, g)
        folder = folder if g == 0 else folder / "compact"
        deploy = folder / "deploy.prototxt"
        net = load_net(deploy, folder / WEIGHTS_FILE)
        proto = parse_prototxt(deploy, caffe_pb2().NetParameter())
        loaded[g] = (net, runtime.ort_session(onnx_export.convert(proto, net), threads=1))
    return loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--generations", default="0,13")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    generations = [int(g) for g in args.generations.split(",")]
    if generations[0] != 0:
        parser.error("--generations must start with 0 (the ancestor the speed-ups are against)")
    loaded = networks(args.run, generations)
    times: dict[tuple[int, str], list[float]] = {}
    for _ in range(args.rounds):
        for g, (net, session) in loaded.items():
            caffe_ms = net_latency(net, 1, args.repeats, warmup=20)["median_ms"]
            ort_ms = runtime.ort_latency(session, 1, args.repeats, warmup=20)["median_ms"]
            times.setdefault((g, "pycaffe"), []).append(caffe_ms)
            times.setdefault((g, "onnxruntime"), []).append(ort_ms)
    print(f"{args.run}: {args.rounds} rounds x {args.repeats} batch-1 passes, load {os.getloadavg()[0]:.1f}")
    print("| gen | network | pycaffe ms | pycaffe speed-up | ORT 1-thread ms | ORT speed-up |")
    print("|---|---|---|---|---|---|")
    base = {rt: float(np.median(times[(0, rt)])) for rt in ("pycaffe", "onnxruntime")}
    for g in generations:
        ms = {rt: float(np.median(times[(g, rt)])) for rt in base}
        cells = " | ".join(f"{ms[rt]:.3f} | {base[rt] / ms[rt]:.2f}x" for rt in base)
        print(f"| {g} | {'full' if g == 0 else 'compact'} | {cells} |")


if __name__ == "__main__":
    main()
