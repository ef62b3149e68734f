"""Benchmark: CPU speed of every generation's compact network against the ancestor, beside the MAC reduction.

    .venv/bin/python bench/bench_speed.py runs/bench-evolution/cluster-seed0 [--repeats 200]

Re-times (pycaffe, CPU, this process, medians after warm-up) the ancestor's full network and each
generation's compact network (``gen_NNN/compact``, written by evolution) at batch 1 and batch 64, so that
the figures come from one quiet process rather than from the timings taken during the run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from caffe_evo import lineage
from caffe_evo.compaction import cost, latency
from caffe_evo.measure import COMPACT_DIR
from caffe_evo.recipe import DEPLOY_FILE
from caffe_evo.training import WEIGHTS_FILE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    generations = len(lineage.generations(args.run))
    ancestor = lineage.generation_dir(args.run, 0)
    nets = [("ancestor (full)", ancestor)] + [
        (f"gen {g} compact", lineage.generation_dir(args.run, g) / COMPACT_DIR) for g in range(1, generations)
    ]
    rows = []
    for label, folder in nets:
        deploy, weights = folder / DEPLOY_FILE, folder / WEIGHTS_FILE
        single = latency(deploy, weights, 1, repeats=args.repeats, warmup=20)
        batch = latency(deploy, weights, 64, repeats=max(20, args.repeats // 5), warmup=5)
        rows.append((label, cost(deploy, weights)["macs"], single["median_ms"], batch["images_per_s"]))
    base_macs, base_ms, base_ips = rows[0][1:]
    print(f"run: {args.run}; pycaffe CPU, median of {args.repeats} batch-1 passes after 20 warm-up passes")
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
