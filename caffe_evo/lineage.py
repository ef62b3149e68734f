"""The lineage on disk: one folder per run, one per generation, every file written atomically.

    RUN/run.json                          configuration, versions, seed
    RUN/gen_000/                          the ancestor (a training folder plus masks.npz)
    RUN/gen_NNN/                          the surviving offspring of generation NNN
    RUN/candidates/gen_NNN/aA_cK/         every offspring trained (attempt A, candidate K)

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


def table(run: Path) -> str:
    """The generation table as the papers report it (efficiencies relative to the ancestor)."""
    rows = generations(run)
    if not rows:
        raise CaffeEvoError(f"{run}: no completed generation")
    header = (
        f"{'gen':>3}  {'synapses':>9}  {'syn. eff.':>9}  {'clusters':>8}  {'clu. eff.':>9}  "
        f"{'val acc':>7}  {'test acc':>8}  {'train s':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['generation']:>3}  {row['synapses']:>9,}  {row['synaptic_efficiency']:>8.2f}x  "
            f"{row['clusters']:>8,}  {row['cluster_efficiency']:>8.2f}x  {100 * row['val_accuracy']:>6.2f}%  "
            f"{100 * row['test_accuracy']:>7.2f}%  {row['train_seconds']:>7.1f}"
        )
    return "\n".join(lines)
