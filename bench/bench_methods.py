"""Benchmark: evolution variants and baselines on one dataset, several seeds, equal training budget.

    .venv/bin/python bench/bench_methods.py --dataset mnist --seeds 0,1,2 --generations 6 --iters 1000 \
        --methods plain,synapse,fp16,stress,magnitude,l1,control

Every method starts from the same trained ancestor (runs/bench-ancestor for MNIST,
runs/bench-ancestor-fashion for Fashion-MNIST) and gets generations x iters training iterations:
- plain: cluster-driven evolution with the default settings;
- synapse: the same with the synapse-level encoding (Darwin 2016);
- fp16: the same with synaptic precision restriction to fp16 after every generation;
- stress: the same with StressedNets-style stress (--stress-* options below);
- magnitude: iterative magnitude pruning (Han et al. 2015), per-layer fraction per round chosen so that
  the rounds reach plain evolution's mean final synaptic efficiency;
- l1: one-shot L1 filter pruning (Li et al. 2017) removing the share of kernels that matches plain
  evolution's mean final cluster efficiency, then fine-tuned for the whole budget;
- control: plain evolution's final architecture (same seed) re-initialised and trained for the budget.
Runs that exist are resumed, so an interrupted benchmark continues. Prints one row per run, the
per-method summary (mean ± std over seeds), the fp16 accuracy cost per generation, and writes
`<out>/compare/` with caffe-evo's comparison table and plot.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from caffe_evo import lineage
from caffe_evo.compare import summarise, write_comparison
from caffe_evo.evolution import EvolutionConfig, resume, start

ROOT = Path(__file__).resolve().parent.parent
DATASETS = {
    "mnist": ("lenet5", "bench-ancestor"),
    "fashion-mnist": ("lenet5-fashion", "bench-ancestor-fashion"),
}


def run_one(run: Path, values: dict[str, Any]) -> list[dict[str, Any]]:
    if (run / lineage.RUN_FILE).is_file():
        return resume(run, progress=False).run()
    return start(EvolutionConfig.from_json(values), run, progress=False).run()


def final(histories: list[list[dict[str, Any]]], key: str) -> float:
    return float(np.mean([history[-1][key] for history in histories]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="mnist")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--generations", type=int, default=6)
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--methods", default="plain,synapse,fp16,stress,magnitude,l1,control")
    parser.add_argument("--population", type=int, default=1, help="offspring per generation, every method")
    parser.add_argument("--synapse-factor", help="default: EvolutionConfig's")
    parser.add_argument("--cluster-factor", help="default: EvolutionConfig's")
    parser.add_argument("--stress-level", default="cluster")
    parser.add_argument("--stress-strength", default="0.0")
    parser.add_argument("--stress-period", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    recipe, ancestor = DATASETS[args.dataset]
    out = args.out or ROOT / "runs" / "bench-methods" / args.dataset
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    base = {
        "recipe": str(ROOT / "prototxt" / recipe),
        "ancestor": str(ROOT / "runs" / ancestor),
        "data_root": str(ROOT / "data"),
        "generations": args.generations,
        "iters_per_generation": args.iters,
        "population": args.population,
        **{key: value for key in ("synapse_factor", "cluster_factor") if (value := getattr(args, key))},
    }
    budget = {"generations": 1, "iters_per_generation": args.generations * args.iters}
    variants: dict[str, dict[str, Any]] = {
        "plain": {},
        "synapse": {"encoding": {"level": "synapse"}},
        "fp16": {"precision": "fp16"},
        "stress": {
            "stress_level": args.stress_level,
            "stress_strength": args.stress_strength,
            "stress_period": args.stress_period,
        },
    }
    histories: dict[str, list[list[dict[str, Any]]]] = {}
    runs: list[Path] = []
    for method in methods:
        for seed in seeds:
            if method in variants:
                values = {**base, **variants[method], "seed": seed}
            elif method == "magnitude":
                per_round = 1 - final(histories["plain"], "synaptic_efficiency") ** (-1 / args.generations)
                values = {**base, "method": "magnitude", "prune_fraction": per_round, "seed": seed}
            elif method == "l1":
                share = 1 - 1 / final(histories["plain"], "cluster_efficiency")
                values = {**base, **budget, "method": "l1-filter", "prune_fraction": share, "seed": seed}
            elif method == "control":
                source = out / f"plain-seed{seed}" / f"gen_{args.generations:03d}"
                values = {**base, **budget, "method": "retrain-mask", "mask_source": str(source)}
                values.update(init="reinit", seed=seed)
            else:
                raise SystemExit(f"unknown method {method}")
            if method in ("magnitude", "l1", "control"):
                # A baseline is judged at the end of its budget, not stopped by evolution's accuracy floor.
                values["max_accuracy_drop"] = 1.0
            run = out / f"{method}-seed{seed}"
            history = run_one(run, values)
            histories.setdefault(method, []).append(history)
            runs.append(run)
            last = history[-1]
            print(
                f"{args.dataset} {method:>9} seed {seed}: gen {last['generation']}, "
                f"{last['synaptic_efficiency']:.2f}x synapses, {last['cluster_efficiency']:.2f}x clusters, "
                f"test {100 * last['test_accuracy']:.2f}%",
                flush=True,
            )

    print(f"\n== {args.dataset}: mean ± std over seeds {seeds}, {args.generations} x {args.iters} iterations")
    summary = summarise(runs)
    for label, entries in summary.items():
        e = entries[-1]
        print(
            f"{label:>28}: {e['synaptic_efficiency_mean']:7.2f}x ± {e['synaptic_efficiency_std']:.2f} "
            "synapses, "
            f"{e['cluster_efficiency_mean']:6.2f}x ± {e['cluster_efficiency_std']:.2f} clusters, "
            f"test {100 * e['test_accuracy_mean']:.2f}% ± {100 * e['test_accuracy_std']:.2f}"
        )
    if "fp16" in histories and "plain" in histories:
        print("\nfp16 cost per generation (points of test accuracy, mean over seeds):")
        for g in range(1, args.generations + 1):
            lineage_gap = np.mean(
                [
                    100 * (p[g]["test_accuracy"] - h[g]["test_accuracy"])
                    for p, h in zip(histories["plain"], histories["fp16"], strict=True)
                ]
            )
            rounding = max(
                abs(100 * (h[g]["test_accuracy_fp32"] - h[g]["test_accuracy"])) for h in histories["fp16"]
            )
            print(
                f"  gen {g}: fp32 lineage - fp16 lineage = {lineage_gap:+.2f}; "
                f"largest change by the restriction itself (same weights before/after) = {rounding:.3f}"
            )
    comparison = out / "compare"
    if comparison.exists():
        shutil.rmtree(comparison)
    write_comparison(runs, comparison)
    print(f"\nwrote {comparison}; runs: {json.dumps([str(r) for r in runs])}")


if __name__ == "__main__":
    main()
