"""Populations: lineages of one ancestor under several population / parents / executor settings, side by side.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python bench/bench_populations.py --ancestor runs/lenet5-ancestor \
        --out runs/populations --generations 13 --seed 0 \
        p2m1:--population=2,--parents=1,--workers=2 p2m2:--population=2,--parents=2,--workers=2 \
        p2m2-ray:--population=2,--parents=2,--executor=ray,--workers=2

Each ``NAME:OPTIONS`` is one `caffe-evo evolve` of LeNet-5 with the recipe's ``evolution.yaml`` and the
comma-separated extra options, run one after the other (so that each has the machine's cores to itself)
and resumed where a previous call stopped. Prints per lineage: wall time, the last generation's synaptic
and cluster efficiency and validation/test accuracy against the ancestor's, and one MD5 over every mask
and parameter file of the lineage, so that runs differing only in their executor can be checked for a
bit-identical lineage. With ``--finetune ITERS`` the last generation is also fine-tuned (`caffe-evo
finetune`, skipped where done already) and gets a row of its own, named ``NAME+ftITERS``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from caffe_evo import lineage
from caffe_evo.reproduce import weights_md5
from caffe_evo.training import WEIGHTS_FILE

ROOT = Path(__file__).resolve().parent.parent


def lineage_md5(run: Path) -> str:
    """One digest over the masks and parameters of every generation and every candidate of ``run``."""
    digest = hashlib.md5()
    folders = sorted(run.glob("gen_[0-9][0-9][0-9]")) + sorted(run.glob("candidates/gen_*/*"))
    for folder in folders:
        masks, weights = folder / lineage.MASKS_FILE, folder / WEIGHTS_FILE
        if masks.is_file():
            digest.update(
                f"{folder.relative_to(run)}/masks:{hashlib.md5(masks.read_bytes()).hexdigest()}\n".encode()
            )
        if weights.is_file():  # the parameters only: the file also holds the run's absolute LMDB paths
            digest.update(f"{folder.relative_to(run)}/params:{weights_md5(weights)}\n".encode())
    return digest.hexdigest()


def _row(name: str, options: str, code: int, wall: str, first: dict, last: dict, md5: str) -> str:
    return (
        f"| {name} | `{options}` | {code} | {wall} | {last['generation']} "
        f"| {last['synaptic_efficiency']:.2f}x | {last['cluster_efficiency']:.2f}x "
        f"| {100 * (last['val_accuracy'] - first['val_accuracy']):+.2f} "
        f"| {100 * (last['test_accuracy'] - first['test_accuracy']):+.2f} | `{md5}` |"
    )


def _finetuned(
    name: str, options: str, run: Path, generation: int, iters: int, first: dict, env: dict[str, str]
) -> str:
    """Fine-tune the generation (unless done before) and its row."""
    source = lineage.generation_dir(run, generation)
    tuned = lineage.finetune_dir(source, iters)
    started = time.perf_counter()
    code = 0
    if not (tuned / lineage.METRICS_FILE).is_file():
        command = ["finetune", str(source), "--iters", str(iters), "--no-progress"]
        code = subprocess.run([sys.executable, "-m", "caffe_evo.cli", *command], env=env).returncode
    if code:
        return f"| {name}+ft{iters} | `{options}` | {code} | | | | | | | |"
    metrics = lineage.read_json(tuned / lineage.METRICS_FILE)
    wall = f"{time.perf_counter() - started:.0f} s"
    return _row(f"{name}+ft{iters}", options, code, wall, first, metrics, "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ancestor", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--generations", type=int, default=13)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--finetune", type=int, metavar="ITERS", help="also fine-tune the last generation")
    parser.add_argument("runs", nargs="+", help="NAME:--option=value,--option=value")
    args = parser.parse_args()
    env = {**os.environ, "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1")}
    rows = []
    for spec in args.runs:
        name, _, options = spec.partition(":")
        run = args.out / name
        extra = [part for option in options.split(",") if option for part in option.split("=", 1)]
        if (run / lineage.RUN_FILE).is_file():
            command = ["--resume", str(run), "--generations", str(args.generations), *extra]
        else:
            command = [
                "--recipe", str(ROOT / "prototxt" / "lenet5"),
                "--config", str(ROOT / "prototxt" / "lenet5" / "evolution.yaml"),
                "--ancestor", str(args.ancestor), "--out", str(run),
                "--generations", str(args.generations), "--seed", str(args.seed), *extra,
            ]  # fmt: skip
        started = time.perf_counter()
        load = os.getloadavg()[0]
        done = subprocess.run([sys.executable, "-m", "caffe_evo.cli", "evolve", *command], env=env)
        wall = time.perf_counter() - started
        history = lineage.generations(run)
        if not history:  # it failed before its ancestor was in place (its own message says why)
            rows.append(f"| {name} | `{options}` | {done.returncode} | | | | | | | |")
            print(rows[-1], flush=True)
            continue
        first, last = history[0], history[-1]
        rows.append(
            _row(
                name,
                options,
                done.returncode,
                f"{wall:.0f} s (load {load:.1f} at start)",
                first,
                last,
                lineage_md5(run)[:12],
            )
        )
        print(rows[-1], flush=True)
        if args.finetune and done.returncode == 0:
            rows.append(_finetuned(name, options, run, last["generation"], args.finetune, first, env))
            print(rows[-1], flush=True)
    print("| run | options | exit | wall | gen | synaptic eff. | cluster eff. | val (points) | test (points) "
          "| lineage md5 |")  # fmt: skip
    print("|" + "---|" * 10)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
