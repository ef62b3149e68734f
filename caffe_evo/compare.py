"""Side-by-side comparison of runs: evolution against the baselines, with the spread over seeds.

Runs are grouped by method (method, encoding level, stress, precision); within a group each generation's
figures are averaged over the runs (seeds), with their standard deviation. Output: ``compare.md``,
``compare.csv`` and ``compare.png`` (test accuracy against synaptic efficiency, cluster efficiency and
the compact network's batch-1 CPU speed), one curve per method.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from caffe_evo import atomic, lineage
from caffe_evo.errors import CaffeEvoError
from caffe_evo.report import measures, rows

# Published anchors (LeNet-5 / MNIST) printed beside the comparison.
ANCHORS = [
    ("Han et al. 2015, magnitude pruning", "12x", "0.77% error"),
    ("Guo et al. 2016, Dynamic Network Surgery", "108x", "0.91% error"),
    ("Shafiee et al. 2016, cluster-driven evolution", "~125x", "-1.7 points"),
]
FIGURES = ("synaptic_efficiency", "cluster_efficiency", "fps_batch1_compact")


def method_label(config: dict[str, Any]) -> str:
    method = config.get("method", "evolution")
    if method == "evolution":
        label = f"evolution/{config['encoding']['level']}"
    elif method == "magnitude":
        label = f"magnitude/{config.get('prune_scope', 'layer')}"
    else:
        label = method
    if config.get("stress_level", "off") != "off":
        label += f"+stress({config['stress_level']})"
    if config.get("precision", "fp32") != "fp32":
        label += f"+{config['precision']}"
    return label


def summarise(runs: list[Path]) -> dict[str, list[dict[str, Any]]]:
    """Per method, per generation: mean and std of each figure over that method's runs."""
    groups: dict[str, list[list[dict[str, Any]]]] = {}
    for run in runs:
        history = lineage.generations(run)
        if not history:
            raise CaffeEvoError(f"{run}: no completed generation")
        groups.setdefault(method_label(lineage.read_run(run)["config"]), []).append(rows(history))
    kinds = {measures(table) for tables in groups.values() for table in tables}
    if len(kinds) > 1:
        raise CaffeEvoError(
            "cannot compare classifier runs with detector runs: their quality measures differ"
        )
    # The test-set quality measures of the task (accuracy; or precision, recall, mAP), the last the headline.
    quality = [f"test_{m}" for m in next(iter(kinds))]
    summary = {}
    for label, tables in groups.items():
        depth = min(len(table) for table in tables)
        per_generation = []
        for g in range(depth):
            entry: dict[str, Any] = {"generation": g, "runs": len(tables)}
            for figure in (*FIGURES, *quality):
                values = [table[g][figure] for table in tables if table[g][figure] != ""]
                entry[f"{figure}_mean"] = float(np.mean(values)) if values else float("nan")
                entry[f"{figure}_std"] = float(np.std(values)) if values else float("nan")
            per_generation.append(entry)
        summary[label] = per_generation
    return summary


def to_csv(summary: dict[str, list[dict[str, Any]]]) -> str:
    buffer = io.StringIO()
    fields = ["method", *next(iter(summary.values()))[0]]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for label, entries in summary.items():
        for entry in entries:
            writer.writerow({"method": label, **entry})
    return buffer.getvalue()


def plot(summary: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    axes_spec = [
        ("synaptic_efficiency", "synaptic efficiency (x, log)", True),
        ("cluster_efficiency", "cluster efficiency (x, log)", True),
        ("fps_batch1_compact", "compact net, batch-1 CPU frames/s", False),
    ]
    headline = _quality(summary)[-1]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for ax, (figure, xlabel, log) in zip(axes, axes_spec, strict=True):
        for label, entries in summary.items():
            xs = [e[f"{figure}_mean"] for e in entries]
            ys = [100 * e[f"{headline}_mean"] for e in entries]
            yerr = [100 * e[f"{headline}_std"] for e in entries]
            ax.errorbar(xs, ys, yerr=yerr, marker="o", capsize=2, label=label)
        if log:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())  # "2", not "2x10^0", on short log ranges
        ax.set(xlabel=xlabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(f"{headline.replace('_', ' ')} (%), mean ± std over seeds")
    axes[0].legend(fontsize=8)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def markdown(summary: dict[str, list[dict[str, Any]]], runs: list[Path]) -> str:
    lines = ["# Comparison", "", "Runs: " + ", ".join(f"`{run}`" for run in runs), ""]
    quality = _quality(summary)
    lines += [
        "| method | runs | last gen | synaptic eff. | cluster eff. | "
        + "".join(f"{key.replace('_', ' ')} | " for key in quality)
        + "compact fps (b1) |",
        "|---|---|---|---|---|" + "---|" * len(quality) + "---|",
    ]
    for label, entries in summary.items():
        last = entries[-1]

        def cell(figure: str, scale: float = 1.0, unit: str = "", last: dict = last) -> str:
            mean, std = last[f"{figure}_mean"], last[f"{figure}_std"]
            return "not measured" if np.isnan(mean) else f"{scale * mean:.2f}{unit} ± {scale * std:.2f}"

        lines.append(
            f"| {label} | {last['runs']} | {last['generation']} | {cell('synaptic_efficiency', unit='x')} | "
            f"{cell('cluster_efficiency', unit='x')} | "
            + "".join(f"{cell(key, 100, '%')} | " for key in quality)
            + f"{cell('fps_batch1_compact')} |"
        )
    lines += [
        "",
        "Published anchors (LeNet-5 / MNIST):",
        "",
        "| work | synaptic eff. | accuracy |",
        "|---|---|---|",
    ]
    lines += [f"| {' | '.join(anchor)} |" for anchor in ANCHORS]
    lines += ["", "![compare](compare.png)"]
    return "\n".join(lines) + "\n"


def _quality(summary: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The summary's test-set quality figures (``summarise`` adds them after FIGURES)."""
    first = next(iter(summary.values()))[0]
    return [key[: -len("_mean")] for key in first if key.startswith("test_") and key.endswith("_mean")]


def write_comparison(runs: list[Path], out: Path) -> Path:
    """Write ``out/`` (compare.md, compare.csv, compare.png) atomically."""
    runs = [Path(run) for run in runs]
    for run in runs:
        lineage.read_run(run)
    summary = summarise(runs)
    with atomic.atomic_path(Path(out), directory=True) as tmp:
        (tmp / "compare.csv").write_text(to_csv(summary))
        plot(summary, tmp / "compare.png")
        (tmp / "compare.md").write_text(markdown(summary, runs))
    return Path(out)
