"""Fine-tuning a chosen generation (GenSynth's "fine-tune a cycle"): more training with its mask kept.

``RUN/gen_NNN`` is trained ``iters`` more iterations from its weights, every pruned synapse held at zero,
with the run's offspring solver (the learning rate falling linearly to 0); the result is the sibling
folder ``RUN/gen_NNN_ftITERS`` with its own masks, metrics and compact network, which the run's report
lists beside the lineage. Nothing in the lineage changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from caffe_evo import evolution, lineage, masking, netstats
from caffe_evo.deploy.measure import compact_generation
from caffe_evo.errors import CaffeEvoError
from caffe_evo.training import METRICS_FILE, WEIGHTS_FILE, TrainOptions, train


def finetune(
    gen_dir: Path, iters: int, out: Path | None = None, seed: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Fine-tune the generation in ``gen_dir`` into ``out`` (default: its sibling); the new metrics."""
    gen_dir = Path(gen_dir).resolve()
    if iters < 1:
        raise CaffeEvoError(f"--iters must be positive, got {iters}")
    for name in (METRICS_FILE, lineage.MASKS_FILE, WEIGHTS_FILE):
        if not (gen_dir / name).is_file():
            raise CaffeEvoError(f"{gen_dir}: not a generation folder of a run (no {name})")
    source = lineage.read_json(gen_dir / METRICS_FILE)
    out = Path(out).resolve() if out is not None else lineage.finetune_dir(gen_dir, iters)
    if out.exists():
        raise CaffeEvoError(f"{out}: already exists (choose another --out or remove it)")
    evo = evolution.resume(gen_dir.parent, progress)  # the run's recipe, data and solver settings
    config = evo.config
    ancestor = lineage.read_json(lineage.generation_dir(evo.run_dir, 0) / METRICS_FILE)
    masks = masking.load(gen_dir / lineage.MASKS_FILE)
    options = TrainOptions(
        max_iter=iters,
        seed=config.seed if seed is None else seed,
        weights=gen_dir / WEIGHTS_FILE,
        weight_masks=masks,
        precision=config.precision,
        bn_batches=config.bn_batches,
        solver_overrides={**config.solver_overrides, **config.offspring_solver},
        progress=progress,
    )
    counts = {"synapses": ancestor["ancestor_synapses"], "clusters": ancestor["ancestor_clusters"]}

    def finalize(work: Path, metrics: dict[str, Any]) -> dict[str, Any]:
        masking.save(work / lineage.MASKS_FILE, masks)
        return {
            **metrics,
            **netstats.efficiency_report(masks, counts, evo.granularity),
            "generation": source["generation"],
            "finetuned_from": str(gen_dir),
            "finetune_iters": iters,
        }

    metrics = train(evo.recipe, out, options, finalize=finalize)
    if not config.measure:
        return metrics
    try:
        return compact_generation(out)
    except CaffeEvoError as exc:
        raise CaffeEvoError(
            f"{exc}; the fine-tuned network is kept in {out} (caffe-evo compact it)"
        ) from None
