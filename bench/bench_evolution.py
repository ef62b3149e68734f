"""Benchmark: LeNet-5 on the official MNIST split, N generations per encoding, beside the published figures.

    .venv/bin/python bench/bench_evolution.py [--ancestor runs/bench-ancestor] [--generations 13] \
        [--encodings synapse,cluster] [--seed 0] [--out runs/bench-evolution] [--config FILE] \
        [EvolutionConfig overrides]

For each encoding it runs a whole lineage through the Python API (training the ancestor too unless
``--ancestor`` gives one) and prints the generation table,
the published cluster-paper figures, the run's wall time and where that time went: pure Caffe solver
time, the mask callback, Caffe's evaluation passes and net set-up, compaction with its latency
measurements (issue 5's work, reported apart), and the rest of the engine (encoding, sampling,
bookkeeping, I/O). Overrides are `key=value` pairs of EvolutionConfig fields, e.g.
`synapse_factor=0.8 cluster_factor=0.9 init=reinit`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml

from caffe_evo import lineage
from caffe_evo.encoding import EncodingConfig
from caffe_evo.errors import CaffeEvoError, SelectionExhausted
from caffe_evo.evolution import EvolutionConfig, start

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = "published (cluster-driven, LeNet-5/MNIST, gen 13): ~125x synapses, 9.71x clusters, -1.7 points"


def time_breakdown(run: Path, history: list[dict], wall: float, with_ancestor: bool) -> dict[str, float]:
    """Seconds by category over every network trained in the run: every offspring candidate (not only
    the survivors), and the ancestor when the run trained it."""
    candidates = [
        lineage.read_json(path) for path in sorted((run / "candidates").glob("gen_*/*/metrics.json"))
    ] + history[:1] * with_ancestor
    mask = sum(m["mask_seconds"] for m in candidates)
    solver = sum(m["solver_seconds"] for m in candidates) - mask
    evaluation = sum(m["eval_seconds"] for m in candidates)
    setup = sum(m["setup_seconds"] for m in candidates)
    # Compaction and timing run once per generation, on the survivor (and on the ancestor).
    measurement = sum(m.get("cost", {}).get("measure_seconds", 0.0) for m in history)
    return {
        "wall": wall,
        "caffe_solver": solver,
        "caffe_eval": evaluation,
        "caffe_net_setup": setup,
        "compaction_and_timing": measurement,
        "mask_callback": mask,
        "engine_rest": wall - solver - evaluation - setup - measurement - mask,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ancestor", type=Path, help="a `caffe-evo train` output folder (default: the run trains one)"
    )
    parser.add_argument("--generations", type=int, default=13)
    parser.add_argument("--encodings", default="synapse,cluster")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-evolution")
    parser.add_argument(
        "--config", type=Path, help="a YAML run configuration, e.g. prototxt/lenet5/evolution.yaml"
    )
    parser.add_argument("overrides", nargs="*", help="EvolutionConfig key=value, over --config")
    args = parser.parse_args()
    if args.config and not args.config.is_file():
        parser.error(f"--config: no such file: {args.config}")
    overrides = yaml.safe_load(args.config.read_text()) if args.config else {}
    overrides.update({k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.overrides)})

    for level in args.encodings.split(","):
        run = args.out / f"{level}-seed{args.seed}"
        try:  # a bad option is reported before the previous run in `run` is replaced
            config = EvolutionConfig.from_json(
                {
                    "recipe": str(ROOT / "prototxt" / "lenet5"),
                    "generations": args.generations,
                    "seed": args.seed,
                    "ancestor": str(args.ancestor.resolve()) if args.ancestor else None,
                    "data_root": str(ROOT / "data"),
                    **overrides,
                    "encoding": {**overrides.get("encoding", {}), "level": level},
                }
            )
            config.validate()
        except CaffeEvoError as error:
            parser.error(str(error))
        assert isinstance(config.encoding, EncodingConfig)
        shutil.rmtree(run, ignore_errors=True)
        started = time.perf_counter()
        stopped = None
        try:
            start(config, run, progress=False).run()
        except SelectionExhausted as error:  # natural selection gave up: report the lineage kept so far
            stopped = str(error)
        wall = time.perf_counter() - started
        history = lineage.generations(run)
        breakdown = time_breakdown(run, history, wall, with_ancestor=args.ancestor is None)
        last, first = history[-1], history[0]
        print(f"\n== {level}-level encoding, seed {args.seed}, {run}")
        print(f"config: {json.dumps(config.to_json(), sort_keys=True)}")
        print(lineage.table(run))
        drop = 100 * (first["test_accuracy"] - last["test_accuracy"])
        print(
            f"generation {last['generation']}: {last['synaptic_efficiency']:.2f}x synapses, "
            f"{last['cluster_efficiency']:.2f}x clusters, test accuracy -{drop:.2f} points"
        )
        if stopped:
            print(f"stopped: {stopped}")
        print(PUBLISHED)
        overhead = breakdown["mask_callback"] + breakdown["engine_rest"]
        print(
            "time (s): "
            + ", ".join(f"{k} {v:.1f}" for k, v in breakdown.items())
            + f"; engine overhead (mask + rest) = {100 * overhead / breakdown['caffe_solver']:.1f}% "
            "of the pure solver time"
        )


if __name__ == "__main__":
    main()
