"""Training with Caffe's own solver through pycaffe, and evaluation on the solver's test nets.

:func:`train` is the Python API behind ``caffe-evo train``: it writes a self-contained run folder
(resolved prototxts, ``weights.caffemodel``, ``weights.solverstate``, ``loss.csv``, ``metrics.json``)
atomically, so an interrupted run leaves nothing that looks finished.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from caffe_evo import atomic, batchnorm, masking, precision
from caffe_evo.caffe_env import caffe_pb2, check_nets_build, load_caffe
from caffe_evo.detection.task import DetectionTask
from caffe_evo.errors import CaffeEvoError
from caffe_evo.recipe import (
    DEPLOY_FILE,
    SOLVER_FILE,
    TRAIN_VAL_FILE,
    Recipe,
    parse_prototxt,
    set_solver_fields,
    to_prototxt,
)
from caffe_evo.stress import StressSignal
from caffe_evo.weights import check_matches, read_caffemodel

WEIGHTS_FILE = "weights.caffemodel"
SOLVERSTATE_FILE = "weights.solverstate"
METRICS_FILE = "metrics.json"
LOSS_FILE = "loss.csv"

# Iterations per solver.step() call: short enough for a live progress bar, long enough that the
# Python round trip is negligible next to Caffe's own work.
_STEP_CHUNK = 20

# Called inside the atomic write of a training folder: (folder, metrics) -> metrics to store.
Finalizer = Callable[[Path, dict[str, Any]], dict[str, Any]]


@dataclass
class TrainOptions:
    """What may differ from the recipe's solver for one training run."""

    max_iter: int | None = None
    seed: int | None = None
    weights: Path | None = None  # initial weights (fine-tuning); None = the recipe's fillers
    init_params: dict[str, list[np.ndarray]] | None = None  # initial blobs by layer, set after `weights`
    weight_masks: dict[str, np.ndarray] | None = None  # pruned synapses (False) stay exactly 0.0
    precision: str = "fp32"  # restrict the trained weights to this format (see caffe_evo.precision)
    stress: StressSignal | None = None  # training-time stress (see caffe_evo.stress)
    # training batches over which BatchNorm statistics are re-estimated after training (caffe_evo.batchnorm);
    # 0 keeps Caffe's moving averages. Nets without BatchNorm skip the step.
    bn_batches: int = 50
    solver_overrides: dict[str, Any] = field(default_factory=dict)
    verbose: bool = False
    progress: bool = True


def loss_blob_names(net_param: Any) -> list[str]:
    """Tops of a NetParameter's loss layers: types ending in ``Loss``, and any layer with a loss weight."""
    return [
        top
        for layer in net_param.layer
        if layer.type.endswith("Loss") or any(layer.loss_weight)
        for top in layer.top
    ]


def evaluate(net: Any, iterations: int) -> dict[str, float]:
    """Average every scalar output of ``net`` over ``iterations`` forward passes, as Caffe's Solver::Test."""
    sums: dict[str, float] = {}
    for _ in range(iterations):
        outputs = net.forward()
        for name, value in outputs.items():
            sums[name] = sums.get(name, 0.0) + float(np.mean(value))
    return {name: total / iterations for name, total in sums.items()}


def test_all(solver: Any, recipe: Recipe) -> dict[str, dict[str, float]]:
    """Evaluate every test net of the solver with the current training weights, as the recipe's task does."""
    task = DetectionTask.load(recipe.folder)
    passes = task.passes(recipe) if task is not None else list(recipe.solver.test_iter)
    results = {}
    for i, name in enumerate(recipe.test_net_names()):
        test_net = solver.test_nets[i]
        test_net.share_with(solver.net)
        results[name] = (task.evaluate if task else evaluate)(test_net, passes[i])
    return results


def relocate(src: Path, work: Path, final: Path) -> None:
    """Copy the training folder ``src`` into ``work`` (to be renamed to ``final``), re-pointing its paths.

    Large files are hard-linked; the solver's ``net`` and ``snapshot_prefix`` and the solver state's
    ``learned_net`` are rewritten to point inside ``final``.
    """
    src, final = Path(src).resolve(), Path(final).resolve()
    for item in src.iterdir():
        # Derived folders (compact/, report/) are rebuilt from the files, not carried along.
        if item.name in (SOLVER_FILE, SOLVERSTATE_FILE) or item.is_dir():
            continue
        try:
            os.link(item, work / item.name)
        except OSError:  # another file system
            shutil.copy2(item, work / item.name)
    solver = parse_prototxt(src / SOLVER_FILE, caffe_pb2().SolverParameter())
    solver.net = str(final / Path(solver.net).name)
    solver.snapshot_prefix = str(final / Path(solver.snapshot_prefix).name)
    (work / SOLVER_FILE).write_text(to_prototxt(solver))
    (work / SOLVERSTATE_FILE).write_bytes((src / SOLVERSTATE_FILE).read_bytes())
    _relocate_solverstate(work / SOLVERSTATE_FILE, final / WEIGHTS_FILE)


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
) -> tuple[list[tuple[int, float]], float]:
    """Step the solver ``iterations`` times; return the loss curve and the pure solver time in seconds."""
    curve: list[tuple[int, float]] = []
    solver_seconds = 0.0
    done = 0
    with tqdm(total=iterations, desc=description, unit="it", disable=not progress, leave=False) as bar:
        while done < iterations:
            chunk = min(_STEP_CHUNK, iterations - done)
            start = time.perf_counter()
            solver.step(chunk)
            solver_seconds += time.perf_counter() - start
            done += chunk
            loss = sum(float(solver.net.blobs[name].data) for name in loss_names)
            if not math.isfinite(loss):
                raise CaffeEvoError(f"training diverged: loss is {loss} at iteration {solver.iter}")
            curve.append((solver.iter, loss))
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(chunk)
    return curve, solver_seconds


def check_bn_batches(batches: int) -> None:
    """For training and for a run's configuration, which checks it before anything trains."""
    if batches < 0:
        raise CaffeEvoError(f"--bn-batches must be 0 (off) or more, got {batches}")


def _timed_tests(solver: Any, recipe: Recipe) -> tuple[dict[str, dict[str, float]], float]:
    """:func:`test_all` and the seconds it took."""
    started = time.perf_counter()
    results = test_all(solver, recipe)
    return results, time.perf_counter() - started


def train(
    recipe: Recipe, out: Path, options: TrainOptions | None = None, finalize: Finalizer | None = None
) -> dict[str, Any]:
    """Train ``recipe`` with Caffe's solver into the new folder ``out``; return its metrics.

    ``finalize(folder, metrics)`` runs before the folder is renamed into place, so that what it adds
    (masks, extra metrics) is part of the same atomic write; it returns the metrics to store.
    """
    options = options or TrainOptions()
    out = Path(out).resolve()
    if out.exists():
        raise CaffeEvoError(f"{out}: output folder already exists (choose another --out or remove it)")
    precision.check_choice(options.precision)
    if options.max_iter is not None and options.max_iter <= 0:
        raise CaffeEvoError(f"--iters must be positive, got {options.max_iter}")
    check_bn_batches(options.bn_batches)
    caffe = load_caffe(options.verbose)
    overrides = dict(options.solver_overrides)
    if options.max_iter is not None:
        overrides["max_iter"] = options.max_iter
    if options.seed is not None:
        overrides["random_seed"] = options.seed
    # caffe-evo tests once at the end; Caffe's periodic testing would only repeat that work silently.
    overrides.update(test_interval=2**31 - 1, test_initialization=False, snapshot=0, display=0)
    resolved = caffe_pb2().SolverParameter()
    resolved.CopyFrom(recipe.solver)
    set_solver_fields(resolved, overrides)  # a bad override is one line here, before anything is written
    max_iter = resolved.max_iter
    if max_iter < 1:
        raise CaffeEvoError(
            f"recipe {recipe.name}: max_iter must be positive, got {max_iter} (from its solver, or the "
            "solver overrides)"
        )

    with atomic.atomic_path(out, directory=True) as work:
        setup_started = time.perf_counter()
        solver_path = recipe.write_resolved(work, work, **overrides)
        if not recipe.builds:
            if (task := DetectionTask.load(recipe.folder)) is not None:
                task.check_heads(recipe)
            check_nets_build(
                [(work / TRAIN_VAL_FILE, "TRAIN"), (work / DEPLOY_FILE, "TEST")], f"recipe {recipe.name}"
            )
            recipe.builds = True  # the probe costs a process start; once per recipe is enough
        solver = caffe.get_solver(str(solver_path))
        if options.weights is not None:
            stored = read_caffemodel(options.weights)
            check_matches(solver.net, stored, options.weights, recipe.folder / recipe.solver.net)
            solver.net.copy_from(str(options.weights))
        for name, arrays in (options.init_params or {}).items():
            for blob, array in zip(solver.net.params[name], arrays, strict=True):
                blob.data[...] = array
        gradient_mask = None
        if options.weight_masks is not None:
            blob_counts = {name: len(blobs) for name, blobs in solver.net.params.items()}
            masks = {
                **masking.from_weight_masks(options.weight_masks, solver.net),
                **masking.follower_masks(options.weight_masks, recipe.train_val, blob_counts),
            }
            masking.apply(solver.net, masks)
            gradient_mask = masking.GradientMask(solver.net, masks).attach(solver)
        if options.stress is not None:
            options.stress.attach(solver)
        started = time.perf_counter()
        setup_seconds = started - setup_started
        curve, solver_seconds = run_solver(
            solver,
            max_iter,
            loss_blob_names(recipe.train_val),
            progress=options.progress,
            description=f"train {recipe.name}",
        )
        train_seconds = time.perf_counter() - started
        if gradient_mask is not None and (bad := masking.violations(solver.net, masks)):
            raise RuntimeError(f"masked training left {bad} pruned parameters non-zero")
        bn = batchnorm.reestimate(solver.net, options.bn_batches)
        eval_seconds = 0.0  # the test nets' passes alone, not the restriction, snapshot or export between
        restricted: dict[str, Any] = {}
        if options.precision != "fp32":
            unrestricted, eval_seconds = _timed_tests(solver, recipe)
            _snapshot(solver, work, recipe)  # the fp32 network, kept should the restriction fail
            try:
                report = precision.restrict_net(solver.net, options.precision)
                if bn is not None:
                    # the statistics were taken with the fp32 weights; the restricted network computes
                    # with the rounded ones, so they are taken again from it, then rounded themselves
                    bn = bn.plus(batchnorm.reestimate(solver.net, options.bn_batches))
                    report = report.plus(precision.restrict_net(solver.net, options.precision))
            except CaffeEvoError as exc:
                kept = _keep_trained(work, out, recipe, overrides)
                raise CaffeEvoError(
                    f"{exc}; the trained fp32 network is kept in {kept} (train from it with --weights "
                    f"{kept / WEIGHTS_FILE}, or choose another --precision)"
                ) from None
            precision.export(solver.net, work / f"weights_{options.precision}.npz", options.precision)
            restricted = {
                "restriction": report.to_json(),
                **{
                    f"{name}_{key}_fp32": value
                    for name, res in unrestricted.items()
                    for key, value in res.items()
                },
            }
        results, seconds = _timed_tests(solver, recipe)
        eval_seconds += seconds
        _snapshot(solver, work, recipe)
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
            "setup_seconds": round(setup_seconds, 3),
            "eval_seconds": round(eval_seconds, 3),
            "iterations_per_second": round(max_iter / train_seconds, 2),
            "mask_seconds": round(gradient_mask.seconds, 3) if gradient_mask else 0.0,
            "batchnorm_reestimation": bn.to_json() if bn else None,
            "stand_in": recipe.stand_in,
            "final_loss": curve[-1][1],
            "caffe_version": caffe.__version__,
            **{f"{name}_{key}": value for name, res in results.items() for key, value in res.items()},
            "precision": options.precision,
            "stress": options.stress.summary() if options.stress else None,
            **restricted,
        }
        if finalize is not None:
            metrics = finalize(work, metrics)
        atomic.write_json(work / METRICS_FILE, metrics)
    return metrics


def _snapshot(solver: Any, work: Path, recipe: Recipe) -> None:
    """Caffe's snapshot of the current iteration under the run folder's fixed names.

    Caffe's writers abort the whole process on an I/O error, so the space they need (the weights,
    the solver's history of the same size, and room to spare) is checked first.
    """
    size = sum(blob.data.nbytes for blobs in solver.net.params.values() for blob in blobs)
    atomic.check_space(work, 3 * size + 2**20)
    solver.snapshot()
    prefix = work / f"{recipe.snapshot_name}_iter_{solver.iter}"
    Path(f"{prefix}.caffemodel").rename(work / WEIGHTS_FILE)
    Path(f"{prefix}.solverstate").rename(work / SOLVERSTATE_FILE)


def _keep_trained(work: Path, out: Path, recipe: Recipe, overrides: dict[str, Any]) -> Path:
    """Move the snapshot in ``work`` to ``<out>.fp32-trained`` with its prototxts, so that a failure
    after training does not throw the training away; returns that folder."""
    kept = out.with_name(f"{out.name}.fp32-trained")
    with atomic.atomic_path(kept, directory=True) as folder:
        for name in (WEIGHTS_FILE, SOLVERSTATE_FILE):
            os.replace(work / name, folder / name)
        _relocate_solverstate(folder / SOLVERSTATE_FILE, kept / WEIGHTS_FILE)
        recipe.write_resolved(folder, kept, **overrides)
    return kept
