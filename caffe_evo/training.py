"""Training with Caffe's own solver through pycaffe, and evaluation on the solver's test nets.

:func:`train` is the Python API behind ``caffe-evo train``: it writes a self-contained run folder
(resolved prototxts, ``weights.caffemodel``, ``weights.solverstate``, ``loss.csv``, ``metrics.json``)
atomically, so an interrupted run leaves nothing that looks finished.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from caffe_evo import atomic
from caffe_evo.caffe_env import caffe_pb2, check_nets_build, load_caffe
from caffe_evo.errors import CaffeEvoError
from caffe_evo.recipe import DEPLOY_FILE, TRAIN_VAL_FILE, Recipe
from caffe_evo.weights import check_matches, read_caffemodel

WEIGHTS_FILE = "weights.caffemodel"
SOLVERSTATE_FILE = "weights.solverstate"
METRICS_FILE = "metrics.json"
LOSS_FILE = "loss.csv"

# Iterations per solver.step() call: short enough for a live progress bar, long enough that the
# Python round trip is negligible next to Caffe's own work.
_STEP_CHUNK = 20

# A hook called after every solver.step() chunk, e.g. to re-apply pruning masks.
StepHook = Callable[[Any], None]


@dataclass
class TrainOptions:
    """What may differ from the recipe's solver for one training run."""

    max_iter: int | None = None
    seed: int | None = None
    weights: Path | None = None  # initial weights (fine-tuning); None = the recipe's fillers
    solver_overrides: dict[str, Any] = field(default_factory=dict)
    verbose: bool = False
    progress: bool = True


def loss_blob_names(net_param: Any) -> list[str]:
    """Tops of the loss layers of a NetParameter (layer types ending in ``Loss``)."""
    return [top for layer in net_param.layer if layer.type.endswith("Loss") for top in layer.top]


def evaluate(net: Any, iterations: int) -> dict[str, float]:
    """Average every scalar output of ``net`` over ``iterations`` forward passes, as Caffe's Solver::Test."""
    sums: dict[str, float] = {}
    for _ in range(iterations):
        outputs = net.forward()
        for name, value in outputs.items():
            sums[name] = sums.get(name, 0.0) + float(np.mean(value))
    return {name: total / iterations for name, total in sums.items()}


def test_all(solver: Any, recipe: Recipe) -> dict[str, dict[str, float]]:
    """Evaluate every test net of the solver with the current training weights."""
    results = {}
    for i, name in enumerate(recipe.test_net_names()):
        test_net = solver.test_nets[i]
        test_net.share_with(solver.net)
        results[name] = evaluate(test_net, recipe.solver.test_iter[i])
    return results


def _relocate_solverstate(path: Path, weights: Path) -> None:
    """Point the snapshot's ``learned_net`` at where the weights will finally live."""
    state = caffe_pb2().SolverState()
    state.ParseFromString(path.read_bytes())
    state.learned_net = str(weights)
    path.write_bytes(state.SerializeToString())


def run_solver(
    solver: Any,
    iterations: int,
    loss_names: list[str],
    *,
    progress: bool,
    description: str,
    after_step: StepHook | None = None,
) -> tuple[list[tuple[int, float]], float]:
    """Step the solver ``iterations`` times; return the loss curve and the pure solver time in seconds."""
    curve: list[tuple[int, float]] = []
    solver_seconds = 0.0
    bar = tqdm(total=iterations, desc=description, unit="it", disable=not progress, leave=False)
    done = 0
    while done < iterations:
        chunk = min(_STEP_CHUNK, iterations - done)
        start = time.perf_counter()
        solver.step(chunk)
        solver_seconds += time.perf_counter() - start
        if after_step is not None:
            after_step(solver)
        done += chunk
        loss = sum(float(solver.net.blobs[name].data) for name in loss_names)
        if not math.isfinite(loss):
            bar.close()
            raise CaffeEvoError(f"training diverged: loss is {loss} at iteration {solver.iter}")
        curve.append((solver.iter, loss))
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.update(chunk)
    bar.close()
    return curve, solver_seconds


def train(recipe: Recipe, out: Path, options: TrainOptions | None = None) -> dict[str, Any]:
    """Train ``recipe`` with Caffe's solver into the new folder ``out``; return its metrics."""
    options = options or TrainOptions()
    out = Path(out).resolve()
    if out.exists():
        raise CaffeEvoError(f"{out}: output folder already exists (choose another --out or remove it)")
    if options.max_iter is not None and options.max_iter <= 0:
        raise CaffeEvoError(f"--iters must be positive, got {options.max_iter}")
    caffe = load_caffe(options.verbose)
    overrides = dict(options.solver_overrides)
    if options.max_iter is not None:
        overrides["max_iter"] = options.max_iter
    if options.seed is not None:
        overrides["random_seed"] = options.seed
    # caffe-evo tests once at the end; Caffe's periodic testing would only repeat that work silently.
    overrides.update(test_interval=2**31 - 1, test_initialization=False, snapshot=0, display=0)
    max_iter = overrides.get("max_iter", recipe.solver.max_iter)

    with atomic.atomic_path(out, directory=True) as work:
        solver_path = recipe.write_resolved(work, work, **overrides)
        check_nets_build(
            [(work / TRAIN_VAL_FILE, "TRAIN"), (work / DEPLOY_FILE, "TEST")], f"recipe {recipe.name}"
        )
        solver = caffe.get_solver(str(solver_path))
        if options.weights is not None:
            stored = read_caffemodel(options.weights)
            check_matches(solver.net, stored, options.weights, recipe.folder / recipe.solver.net)
            solver.net.copy_from(str(options.weights))
        started = time.perf_counter()
        curve, solver_seconds = run_solver(
            solver,
            max_iter,
            loss_blob_names(recipe.train_val),
            progress=options.progress,
            description=f"train {recipe.name}",
        )
        train_seconds = time.perf_counter() - started
        results = test_all(solver, recipe)
        solver.snapshot()
        _collect_snapshot(work, recipe, solver.iter)
        _relocate_solverstate(work / SOLVERSTATE_FILE, out / WEIGHTS_FILE)
        recipe.write_resolved(work, out, **overrides)
        (work / LOSS_FILE).write_text(
            "iteration,loss\n" + "".join(f"{it},{loss:.6f}\n" for it, loss in curve)
        )
        metrics = {
            "recipe": str(recipe.folder),
            "data_root": str(recipe.data_root),
            "iterations": int(solver.iter),
            "seed": int(overrides.get("random_seed", recipe.solver.random_seed)),
            "init_weights": str(options.weights) if options.weights else None,
            "train_seconds": round(train_seconds, 3),
            "solver_seconds": round(solver_seconds, 3),
            "iterations_per_second": round(max_iter / train_seconds, 2),
            "final_loss": curve[-1][1],
            "caffe_version": caffe.__version__,
            **{f"{name}_{key}": value for name, res in results.items() for key, value in res.items()},
        }
        atomic.write_json(work / METRICS_FILE, metrics)
    return metrics


def _collect_snapshot(work: Path, recipe: Recipe, iteration: int) -> None:
    """Rename Caffe's ``<prefix>_iter_N`` snapshot files to the run folder's fixed names."""
    prefix = work / f"{recipe.snapshot_name}_iter_{iteration}"
    Path(f"{prefix}.caffemodel").rename(work / WEIGHTS_FILE)
    Path(f"{prefix}.solverstate").rename(work / SOLVERSTATE_FILE)
