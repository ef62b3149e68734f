"""The paper-style report of a lineage: ``RUN/report/`` with report.md, lineage.csv and PNG plots.

The plots are the analogues of the precision paper's figures 2 and 3 (synapses and clusters per
generation on a log scale, accuracy per generation, frames per second per generation); the seed papers'
published figures are tabulated beside ours. Efficiencies are always relative to the ancestor.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from caffe_evo import atomic, lineage
from caffe_evo.errors import CaffeEvoError

REPORT_DIR = "report"
_SPLITS = (("val", ""), ("test", ""), ("test", "_fp32"))

# Published figures of the seed papers (METHOD.md), printed beside ours; never claimed as reproduced
# unless the same network and data were run.
PUBLISHED = [
    (
        "Shafiee et al. 2016 (cluster-driven), LeNet-5 / MNIST",
        "generation 13",
        "~125x",
        "9.71x",
        "-1.7 points",
    ),
    ("Shafiee et al. 2016 (cluster-driven), STL-10", "generation 10", "56.27x", "5.96x", "-1.2 points"),
    ("Shafiee et al. 2017 (groups), AlexNet / CIFAR-10", "generation 6", "14.39x", "2.82x", "-2 points"),
    ("Chung et al. 2017-2018 (mating), MNIST", "", "258x", "34x", "~97% accuracy"),
    (
        "Shafiee, Li & Wong 2017 (fp16), DetectNet / Parse-27k",
        "generation 13",
        "~10x",
        "",
        "7 -> 37 fps (TX1)",
    ),
]

COLUMNS = [
    ("generation", "generation"),
    ("synapses", "synapses"),
    ("clusters", "clusters"),
    ("synaptic_efficiency", "synaptic_efficiency"),
    ("cluster_efficiency", "cluster_efficiency"),
    ("train_seconds", "train_seconds"),
]
# The quality measures of a task, each with val_, test_ and (restricted runs) test_..._fp32 columns; the
# last one is the headline. A detector's metrics.json has val_mAP (caffe_evo.detection.task).
QUALITY = {"classification": ("accuracy",), "detection": ("precision", "recall", "mAP")}
COST_COLUMNS = [
    ("macs_full", ("full", "macs")),
    ("macs_compact", ("compact", "macs")),
    ("params_compact", ("compact", "params")),
    ("file_bytes_compact", ("compact", "file_bytes")),
    ("fps_batch1_full", ("full", "fps_batch1")),
    ("fps_batch1_compact", ("compact", "fps_batch1")),
    ("images_per_s_batch64_full", ("full", "images_per_s_batch64")),
    ("images_per_s_batch64_compact", ("compact", "images_per_s_batch64")),
    # ONNX Runtime (CPU) on the fp32 ONNX export, one intra-op thread and all cores.
    ("ort_1t_fps_batch1_full", ("full", "ort_1t_fps_batch1")),
    ("ort_1t_fps_batch1_compact", ("compact", "ort_1t_fps_batch1")),
    ("ort_all_fps_batch1_compact", ("compact", "ort_all_fps_batch1")),
    ("ort_1t_images_per_s_batch64_full", ("full", "ort_1t_images_per_s_batch64")),
    ("ort_1t_images_per_s_batch64_compact", ("compact", "ort_1t_images_per_s_batch64")),
    ("ort_all_images_per_s_batch64_compact", ("compact", "ort_all_images_per_s_batch64")),
]


def measures(history: list[dict[str, Any]]) -> tuple[str, ...]:
    """The quality measures of a lineage's task, from its generations' metrics or report rows."""
    return QUALITY["detection" if "val_mAP" in history[0] else "classification"]


def rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per generation; cost columns are empty where a generation was not measured."""
    table = []
    quality = [f"{split}_{m}{end}" for m in measures(history) for split, end in _SPLITS]
    for metrics in history:
        row = {name: metrics.get(key, "") for name, key in COLUMNS}
        row.update({key: metrics.get(key, "") for key in quality})
        cost = metrics.get("cost") or {}
        for name, (net, key) in COST_COLUMNS:
            row[name] = cost.get(net, {}).get(key, "")
        table.append(row)
    return table


def to_csv(table: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(table[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    return buffer.getvalue()


def plot(table: list[dict[str, Any]], folder: Path) -> list[str]:
    """Write the PNG plots into ``folder``; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def figure(
        name: str, ylabel: str, title: str, series: list[tuple[list, list, str, str]], log: bool
    ) -> str:
        fig, ax = plt.subplots(figsize=(6, 4))
        for xs, ys, style, label in series:
            (ax.semilogy if log else ax.plot)(xs, ys, style, label=label)
        ax.set(xlabel="generation", ylabel=ylabel, title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.savefig(folder / name, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        return name

    gens = [row["generation"] for row in table]
    if "val_mAP" in table[0]:  # the precision paper's figure 3: precision and recall per generation
        quality = figure(
            "precision_recall.png",
            "%",
            "Test precision, recall and mAP per generation",
            [(gens, [100 * row[f"test_{m}"] for row in table], "o-", m) for m in QUALITY["detection"]]
            + [(gens, [100 * row["val_mAP"] for row in table], "s--", "validation mAP")],
            log=False,
        )
    else:
        quality = figure(
            "accuracy.png",
            "accuracy (%)",
            "Accuracy per generation",
            [
                (gens, [100 * row["test_accuracy"] for row in table], "o-", "test"),
                (gens, [100 * row["val_accuracy"] for row in table], "s--", "validation"),
            ],
            log=False,
        )
    names = [
        figure(
            "architecture.png",
            "count (log scale)",
            "Synapses and clusters per generation",
            [
                (gens, [row["synapses"] for row in table], "o-", "synapses"),
                (gens, [row["clusters"] for row in table], "s-", "clusters"),
            ],
            log=True,
        ),
        quality,
    ]
    measured = [row for row in table if row["fps_batch1_compact"] != ""]
    if measured:
        mgens = [row["generation"] for row in measured]
        names.append(
            figure(
                "speed.png",
                "frames per second (batch 1, CPU)",
                "Speed per generation",
                [
                    (mgens, [row["fps_batch1_full"] for row in measured], "o-", "masked full net (pycaffe)"),
                    (mgens, [row["fps_batch1_compact"] for row in measured], "s-", "compact net (pycaffe)"),
                ]
                + [
                    (mgens, [row[key] for row in measured], style, label)
                    for key, style, label in (
                        ("ort_1t_fps_batch1_full", "o--", "masked full net (ONNX Runtime, 1 thread)"),
                        ("ort_1t_fps_batch1_compact", "s--", "compact net (ONNX Runtime, 1 thread)"),
                    )
                    if all(row[key] != "" for row in measured)
                ],
                log=False,
            )
        )
    return names


def markdown(run: Path, table: list[dict[str, Any]], plots: list[str]) -> str:
    config = lineage.read_run(run)["config"]
    first, last = table[0], table[-1]
    headline = measures(table)[-1]
    drop = 100 * (first[f"test_{headline}"] - last[f"test_{headline}"])
    encoding = config.get("encoding", {})
    lines = [
        f"# Lineage report: {run.name}",
        "",
        f"Recipe `{config['recipe']}`, seed {config['seed']}, {encoding.get('level', '?')}-level encoding "
        f"(granularity {encoding.get('granularity', '?')}), environment {config['factor_mode']} "
        f"(synapse {config['synapse_factor']}, cluster {config['cluster_factor']}), init {config['init']}, "
        f"{config['iters_per_generation']} iterations per generation, population {config['population']}, "
        f"precision {config.get('precision', 'fp32')}, stress {config.get('stress_level', 'off')}.",
        "",
        f"Generation {last['generation']}: **{last['synaptic_efficiency']:.2f}x** synaptic efficiency, "
        f"**{last['cluster_efficiency']:.2f}x** cluster efficiency, test {headline} "
        f"{100 * last[f'test_{headline}']:.2f}% ({-drop:+.2f} points against the ancestor's "
        f"{100 * first[f'test_{headline}']:.2f}%).",
    ]
    if last["fps_batch1_compact"] != "" and first["fps_batch1_full"] != "":
        lines.append(
            f"Compact network: {first['macs_full'] / last['macs_compact']:.2f}x fewer multiply-accumulates, "
            f"batch-1 CPU speed {last['fps_batch1_compact'] / first['fps_batch1_full']:.2f}x and batch-64 "
            f"throughput {last['images_per_s_batch64_compact'] / first['images_per_s_batch64_full']:.2f}x "
            "the ancestor's (Caffe, this machine's CPU)."
        )
    if last["ort_1t_fps_batch1_compact"] != "" and first["ort_1t_fps_batch1_full"] != "":
        single = last["ort_1t_fps_batch1_compact"] / first["ort_1t_fps_batch1_full"]
        batch = last["ort_1t_images_per_s_batch64_compact"] / first["ort_1t_images_per_s_batch64_full"]
        lines.append(
            f"In ONNX Runtime (CPU, one thread, the fp32 ONNX export): batch-1 speed {single:.2f}x and "
            f"batch-64 throughput {batch:.2f}x the ancestor's."
        )
    lines += ["", "## Generations", "", _markdown_table(table), ""]
    tree = lineage.family_tree(run)
    if tree:
        note = "Each generation's survivors, fittest first (the first is its gen_NNN), and their parents."
        lines += ["## Family tree", "", note, "", "```", tree, "```", ""]
    tuned = lineage.finetunes(run)
    if tuned:
        rows_tuned = rows(tuned)
        for row, metrics in zip(rows_tuned, tuned, strict=True):
            row["generation"] = f"{row['generation']} +{metrics['finetune_iters']:,} it"
        lines += ["## Fine-tuned generations (`caffe-evo finetune`)", "", _markdown_table(rows_tuned), ""]
    lines += [
        "## Published figures of the seed papers (not reproduced here unless the same net and data)",
        "",
    ]
    lines += ["| work | at | synaptic eff. | cluster eff. | accuracy / speed |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(entry)} |" for entry in PUBLISHED]
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def _markdown_table(table: list[dict[str, Any]]) -> str:
    quality = [(split, m) for m in measures(table) for split in ("val", "test")]
    out = [
        "| gen | synapses | syn. eff. | clusters | clu. eff. | "
        + "".join(f"{split} {m} | " for split, m in quality)
        + "MACs (compact) | fps b1 (compact) | ONNX Runtime fps b1 (compact, 1 thread) |",
        "|" + "---|" * (8 + len(quality)),
    ]
    for row in table:
        macs = f"{row['macs_compact']:,}" if row["macs_compact"] != "" else ""
        fps = f"{row['fps_batch1_compact']:,.0f}" if row["fps_batch1_compact"] != "" else ""
        ort = f"{row['ort_1t_fps_batch1_compact']:,.0f}" if row["ort_1t_fps_batch1_compact"] != "" else ""
        out.append(
            f"| {row['generation']} | {row['synapses']:,} | {row['synaptic_efficiency']:.2f}x | "
            f"{row['clusters']:,} | {row['cluster_efficiency']:.2f}x | "
            + "".join(f"{100 * row[f'{split}_{m}']:.2f}% | " for split, m in quality)
            + f"{macs} | {fps} | {ort} |"
        )
    return "\n".join(out)


def write_report(run: Path) -> Path:
    """Write ``RUN/report/`` (atomically, as one folder) and return its path."""
    run = Path(run)
    history = lineage.generations(run)
    if not history:
        raise CaffeEvoError(f"{run}: no completed generation to report")
    table = rows(history)
    out = run / REPORT_DIR
    with atomic.atomic_path(out, directory=True) as tmp:
        (tmp / "lineage.csv").write_text(to_csv(table))
        plots = plot(table, tmp)
        (tmp / "report.md").write_text(markdown(run, table, plots))
    return out
