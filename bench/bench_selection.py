"""What natural selection chose in finished lineages: per lineage, the generations where the efficiency
penalty changed the winner, and over all lineages the median gap between siblings.

    .venv/bin/python bench/bench_selection.py runs/populations/v7-s0 runs/populations/v7-s1 \
        runs/populations/v7-s2

Reads only each generation's ``metrics.json`` (its ``selection`` summary). A winner "changed" where it is
not the candidate plain validation accuracy would pick (ties to fewer synapses, as ``selection.Fitness``
without a penalty). The gaps are between the two candidates of a generation's single attempt: validation
accuracy in points, and clusters as the log ratio in percent.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from caffe_evo.selection import Fitness
from caffe_evo.training import METRICS_FILE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    leads, gaps = [], []
    for run in args.runs:
        changed = []
        for folder in sorted(run.glob("gen_[0-9][0-9][0-9]")):
            metrics = json.loads((folder / METRICS_FILE).read_text())
            summary = metrics.get("selection")
            if summary is None:  # the ancestor
                continue
            seen = summary["candidates"]
            plain = Fitness(summary["metric"]).rank(seen, summary["floor"])[0]
            if [plain["attempt"], plain["candidate"]] != summary["winner"]:
                changed.append(metrics["generation"])
            if len(seen) == 2:
                a, b = seen
                leads.append(100 * abs(a[summary["metric"]] - b[summary["metric"]]))
                gaps.append(100 * abs(math.log(a["clusters"] / b["clusters"])))
        print(f"{run}: winner changed by the penalty at generations {changed or 'none'}")
    print(
        f"{len(leads)} two-candidate selections: validation lead median "
        f"{statistics.median(leads):.2f} points ({min(leads):.2f}-{max(leads):.2f}); "
        f"cluster gap median {statistics.median(gaps):.1f}% ({min(gaps):.1f}-{max(gaps):.1f}%)"
    )


if __name__ == "__main__":
    main()
