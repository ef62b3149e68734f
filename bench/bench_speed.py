"""Benchmark: CPU speed of every generation's compact network against the ancestor, beside the MAC reduction.

    .venv/bin/python bench/bench_speed.py runs/bench-evolution/cluster-seed0 [--repeats 200] [--rounds 10]

Re-times (pycaffe, CPU, this process, medians after warm-up) the ancestor's full network and each
generation's compact network (``gen_NNN/compact``, written by evolution) at batch 1 and batch 64, so that
the figures come from one quiet process rather than from the timings taken during the run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from caffe_evo import lineage
from caffe_evo.deploy.measure import COMPACT_DIR, net_cost, net_latency
from caffe_evo.recipe import DEPLOY_FILE
from caffe_evo.training import WEIGHTS_FILE
from caffe_evo.weights import load_net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--repeats", type=int, default=200, help="batch-1 passes per network in all")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    generations = len(lineage.generations(args.run))
    ancestor = lineage.generation_dir(args.run, 0)
    nets = [("ancestor (full)", ancestor)] + [
        (f"gen {g} compact", lineage.generation_dir(args.run, g) / COMPACT_DIR) for g in range(1, generations)
    ]
    loaded = [
        (label, folder, load_net(folder / DEPLOY_FILE, folder / WEIGHTS_FILE)) for label, folder in nets
    ]
    # Round-robin over the networks, so that a slow spell of a shared machine hits them all alike.
    single: dict[str, list[float]] = {label: [] for label, _ in nets}
    batch: dict[str, list[float]] = {label: [] for label, _ in nets}
    per_round = max(1, args.repeats // args.rounds)
    for _ in range(args.rounds):
        for label, _, net in loaded:
            single[label].append(net_latency(net, 1, repeats=per_round, warmup=5)["median_ms"])
            batch[label].append(
                net_latency(net, 64, repeats=max(2, per_round // 5), warmup=1)["images_per_s"]
            )
    rows = [
        (
            label,
            net_cost(net, folder / WEIGHTS_FILE)["macs"],
            np.median(single[label]),
            np.median(batch[label]),
        )
        for label, folder, net in loaded
    ]
    base_macs, base_ms, base_ips = rows[0][1:]
    print(
        f"run: {args.run}; pycaffe CPU; {args.rounds} round-robin rounds of {per_round} batch-1 passes "
        f"(and {max(2, per_round // 5)} batch-64 passes) per network; the median of the rounds' medians"
    )
    print(
        f"{'network':>16}  {'MACs':>10}  {'MAC red.':>8}  {'b1 ms':>7}  {'b1 speed-up':>11}  "
        f"{'b64 img/s':>9}  {'b64 gain':>8}"
    )
    for label, macs, ms, ips in rows:
        print(
            f"{label:>16}  {macs:>10,}  {base_macs / macs:>7.2f}x  {ms:>7.3f}  {base_ms / ms:>10.2f}x  "
            f"{ips:>9,.0f}  {ips / base_ips:>7.2f}x"
        )


if __name__ == "__main__":
    main()
