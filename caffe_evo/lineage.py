"""The lineage on disk: one folder per run, one per generation, every file written atomically.

    RUN/run.json                          configuration, versions, seed
    RUN/gen_000/                          the ancestor (a training folder plus masks.npz)
    RUN/gen_NNN/                          the surviving offspring of generation NNN
    RUN/candidates/gen_NNN/aA_cK/         every offspring trained (attempt A, candidate K)
    RUN/gen_NNN_ftI/                      generation NNN fine-tuned I more iterations (caffe-evo finetune)
    RUN/candidates/gen_000/a0_c0/         the ancestor's training (kept should measuring it fail)

A generation or candidate folder exists only once complete (it is renamed into place last), so a run
killed at any point resumes from what exists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from caffe_evo.errors import CaffeEvoError
from caffe_evo.training import METRICS_FILE

RUN_FILE = "run.json"
MASKS_FILE = "masks.npz"


def generation_dir(run: Path, generation: int) -> Path:
    return Path(run) / f"gen_{generation:03d}"


def candidate_dir(run: Path, generation: int, attempt: int, candidate: int) -> Path:
    return Path(run) / "candidates" / f"gen_{generation:03d}" / f"a{attempt}_c{candidate}"


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CaffeEvoError(f"{path}: not found") from None
    except json.JSONDecodeError as exc:
        raise CaffeEvoError(f"{path}: not valid JSON ({exc})") from None


def read_run(run: Path) -> dict[str, Any]:
    run = Path(run)
    if not (run / RUN_FILE).is_file():
        raise CaffeEvoError(f"{run}: not a caffe-evo run (no {RUN_FILE})")
    return read_json(run / RUN_FILE)


def generations(run: Path) -> list[dict[str, Any]]:
    """Metrics of every completed generation, in order."""
    found = []
    generation = 0
    while (metrics := generation_dir(run, generation) / METRICS_FILE).is_file():
        found.append(read_json(metrics))
        generation += 1
    return found


def headline(metrics: dict[str, Any]) -> str:
    """A generation's headline quality measure: a detector's mAP (caffe_evo.detection.task), else accuracy."""
    return "mAP" if "val_mAP" in metrics else "accuracy"


def table(run: Path) -> str:
    """The generation table as the papers report it (efficiencies relative to the ancestor)."""
    rows = generations(run)
    if not rows:
        raise CaffeEvoError(f"{run}: no completed generation")
    measure = headline(rows[0])
    short = {"accuracy": "acc"}.get(measure, measure)
    header = (
        f"{'gen':>3}  {'synapses':>9}  {'syn. eff.':>9}  {'clusters':>8}  {'clu. eff.':>9}  "
        f"{'val ' + short:>7}  {'test ' + short:>8}  {'train s':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['generation']:>3}  {row['synapses']:>9,}  {row['synaptic_efficiency']:>8.2f}x  "
            f"{row['clusters']:>8,}  {row['cluster_efficiency']:>8.2f}x  "
            f"{100 * row[f'val_{measure}']:>6.2f}%  {100 * row[f'test_{measure}']:>7.2f}%  "
            f"{row['train_seconds']:>7.1f}"
        )
    return "\n".join(lines)


def finetune_dir(gen_dir: Path, iters: int) -> Path:
    gen_dir = Path(gen_dir)
    return gen_dir.with_name(f"{gen_dir.name}_ft{iters}")


def finetunes(run: Path) -> list[dict[str, Any]]:
    """Metrics of every fine-tuned generation of the run, by generation and iterations."""
    found = [read_json(p) for p in Path(run).glob("gen_*_ft*/" + METRICS_FILE)]
    return sorted(found, key=lambda m: (m["generation"], m["finetune_iters"]))


def _survivor_label(run: Path, generation: int, attempt: int, candidate: int, winner: bool) -> str:
    if winner:
        return generation_dir(run, generation).name
    return str(candidate_dir(run, generation, attempt, candidate).relative_to(run))


def family_tree(run: Path) -> str:
    """Every generation's survivors (fittest first; the first is gen_NNN) and the parents of each."""
    run = Path(run)
    lines = []
    for metrics in generations(run)[1:]:
        generation = metrics["generation"]
        selection = metrics["selection"]
        for rank, (attempt, k) in enumerate(selection.get("survivors", [selection["winner"]])):
            child = read_json(candidate_dir(run, generation, attempt, k) / METRICS_FILE)
            label = _survivor_label(run, generation, attempt, k, rank == 0)
            parents = child.get("parents") or [generation_dir(run, generation - 1).name]
            metric = selection.get("metric", "val_accuracy")
            lines.append(
                f"{label:<28} {child['synapses']:>9,} synapses  {metric} {child[metric]:.4f}  "
                f"<- {', '.join(parents)}"
            )
    return "\n".join(lines)
