"""Benchmark: every generation of a lineage deployed, in pycaffe and in ONNX Runtime (CPU), with the
export's agreement with pycaffe on the whole test set.

    .venv/bin/python bench/bench_deploy.py runs/bench-default [--repeats 200] [--rounds 10] [--out FILE.json]

For the ancestor's full network and every generation's compact network (``gen_NNN/compact``):

- MACs per image, and the MAC reduction against the ancestor;
- batch-1 latency and batch-64 throughput in pycaffe (its BLAS threads as the environment sets them) and
  in ONNX Runtime on the fp32 ONNX export, with one intra-op thread and with every core; timed
  round-robin over the networks (so that a slow spell of a shared machine hits them all alike), the
  median of the rounds' medians;
- the fp32 ONNX model against pycaffe on every test image: the share with the same top-1 class and the
  largest output difference relative to the largest output;
- test accuracy of pycaffe, of the fp16 ONNX model (fp16 weights; ONNX Runtime's CPU provider computes
  it in fp32, see README) and of the Caffe net with its weights rounded to fp16.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from caffe_evo import atomic, lineage, precision
from caffe_evo.caffe_env import caffe_pb2
from caffe_evo.deploy import onnx_export, runtime
from caffe_evo.deploy.export import check_inputs
from caffe_evo.deploy.measure import COMPACT_DIR, net_cost, net_latency
from caffe_evo.errors import CaffeEvoError
from caffe_evo.recipe import DEPLOY_FILE, parse_prototxt
from caffe_evo.training import WEIGHTS_FILE
from caffe_evo.weights import load_net

TIMED = ("pycaffe", "ort_1t", "ort_all")


def _accuracy(outputs: dict[str, np.ndarray], labels: np.ndarray) -> float:
    (prob,) = outputs.values()
    return float(np.mean(np.argmax(prob, axis=1) == labels))


def check(gen_dir: Path, folder: Path) -> dict[str, Any]:
    """The fp32 and fp16 ONNX models of the net in ``folder`` against pycaffe on every test image."""
    deploy, weights = folder / DEPLOY_FILE, folder / WEIGHTS_FILE
    proto = parse_prototxt(deploy, caffe_pb2().NetParameter())
    net = load_net(deploy, weights)
    feeds, labels, described = check_inputs(gen_dir, net, count=None)
    if labels is None:
        raise CaffeEvoError(f"{gen_dir}: no test images for the net's input ({described})")
    reference = runtime.caffe_forward(net, feeds)
    fp32 = runtime.ort_forward(runtime.ort_session(onnx_export.convert(proto, net)), feeds)
    restricted = load_net(deploy, weights)
    precision.restrict_net(restricted, "fp16")
    fp16_options = onnx_export.ExportOptions(precision="fp16")
    fp16 = runtime.ort_forward(
        runtime.ort_session(onnx_export.convert(proto, restricted, fp16_options)), feeds
    )
    (agreement,) = runtime.agreement(reference, fp32).values()
    return {
        "images": len(labels),
        "onnx_top1_agreement": agreement["top1_agreement"],
        "onnx_max_rel_diff": agreement["max_rel_diff"],
        "caffe_test_accuracy": _accuracy(reference, labels),
        "onnx_test_accuracy": _accuracy(fp32, labels),
        "caffe_fp16_test_accuracy": _accuracy(runtime.caffe_forward(restricted, feeds), labels),
        "onnx_fp16_test_accuracy": _accuracy(fp16, labels),
    }


def call_overhead_ms(shape: tuple[int, ...], repeats: int) -> float:
    """Batch-1 latency of an ONNX model that only copies its input: ONNX Runtime's fixed cost per call."""
    import onnx
    from onnx import helper

    dims = ["batch", *shape[1:]]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, dims)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    return runtime.ort_latency(runtime.ort_session(model, 1), 1, repeats, warmup=20)["median_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--repeats", type=int, default=200, help="batch-1 passes per network and runtime")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()
    generations = len(lineage.generations(args.run))
    if generations == 0:
        raise SystemExit(f"bench_deploy: {args.run}: no completed generation")
    nets = [("ancestor (full)", 0, lineage.generation_dir(args.run, 0))] + [
        (f"gen {g} compact", g, lineage.generation_dir(args.run, g) / COMPACT_DIR)
        for g in range(1, generations)
    ]
    loaded = []
    for label, g, folder in nets:
        net = load_net(folder / DEPLOY_FILE, folder / WEIGHTS_FILE)
        model = onnx_export.convert(parse_prototxt(folder / DEPLOY_FILE, caffe_pb2().NetParameter()), net)
        sessions = {
            "ort_1t": runtime.ort_session(model, 1),
            "ort_all": runtime.ort_session(model, runtime.all_cores()),
        }
        loaded.append((label, g, folder, net, sessions, net_cost(net, folder / WEIGHTS_FILE)["macs"]))
    single = {(label, kind): [] for label, *_ in loaded for kind in TIMED}
    batch = {(label, kind): [] for label, *_ in loaded for kind in TIMED}
    per_round = max(1, args.repeats // args.rounds)
    per_round_64 = max(2, per_round // 5)
    for _ in range(args.rounds):
        for label, _, _, net, sessions, _ in loaded:
            single[label, "pycaffe"].append(net_latency(net, 1, repeats=per_round, warmup=5)["median_ms"])
            batch[label, "pycaffe"].append(
                net_latency(net, 64, repeats=per_round_64, warmup=1)["images_per_s"]
            )
            for kind, session in sessions.items():
                single[label, kind].append(runtime.ort_latency(session, 1, per_round, warmup=5)["median_ms"])
                batch[label, kind].append(
                    runtime.ort_latency(session, 64, per_round_64, warmup=1)["images_per_s"]
                )
    rows = []
    for label, g, folder, _, _, macs in loaded:
        row: dict[str, Any] = {"network": label, "generation": g, "macs": macs}
        for kind in TIMED:
            row[f"{kind}_ms_batch1"] = float(np.median(single[label, kind]))
            row[f"{kind}_images_per_s_batch64"] = float(np.median(batch[label, kind]))
        row.update(check(lineage.generation_dir(args.run, g), folder))
        rows.append(row)
    base = rows[0]
    print(
        f"run: {args.run}; CPU, {runtime.all_cores()} cores; {args.rounds} round-robin rounds of {per_round} "
        f"batch-1 and {per_round_64} batch-64 passes per network and runtime; medians of the rounds' medians"
    )
    header = (
        "| network | MACs | MAC red. | pycaffe b1 ms | ORT 1t b1 ms | ORT all b1 ms | pycaffe b1 speed-up "
        "| ORT 1t b1 speed-up | pycaffe b64 img/s | ORT 1t b64 img/s | ORT all b64 img/s "
        "| ONNX top-1 = Caffe | max rel. diff | test acc. Caffe | fp16 ONNX | fp16 Caffe |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for row in rows:
        cells = [
            row["network"],
            f"{row['macs']:,}",
            f"{base['macs'] / row['macs']:.2f}x",
            *(f"{row[f'{kind}_ms_batch1']:.3f}" for kind in TIMED),
            f"{base['pycaffe_ms_batch1'] / row['pycaffe_ms_batch1']:.2f}x",
            f"{base['ort_1t_ms_batch1'] / row['ort_1t_ms_batch1']:.2f}x",
            *(f"{row[f'{kind}_images_per_s_batch64']:,.0f}" for kind in TIMED),
            f"{100 * row['onnx_top1_agreement']:.2f}% of {row['images']:,}",
            f"{row['onnx_max_rel_diff']:.1e}",
            *(f"{100 * row[key]:.2f}%" for key in ("caffe_test_accuracy", "onnx_fp16_test_accuracy")),
            f"{100 * row['caffe_fp16_test_accuracy']:.2f}%",
        ]
        print("| " + " | ".join(cells) + " |")
    last = rows[-1]
    reduction = base["macs"] / last["macs"]
    runtimes = (
        ("pycaffe", "pycaffe"),
        ("ort_1t", "ONNX Runtime, 1 thread"),
        ("ort_all", "ONNX Runtime, all cores"),
    )
    for kind, name in runtimes:
        speedup = base[f"{kind}_ms_batch1"] / last[f"{kind}_ms_batch1"]
        print(
            f"{last['network']} over the ancestor, batch 1, {name}: {speedup:.2f}x, "
            f"{speedup / reduction:.2f} of the {reduction:.2f}x MAC reduction"
        )
    shape = tuple(loaded[0][3].blobs[loaded[0][3].inputs[0]].data.shape)
    overhead = call_overhead_ms(shape, args.repeats)
    print(f"ONNX Runtime's fixed cost per call (an Identity model of the input, batch 1): {overhead:.3f} ms")
    faster = all(row["ort_1t_ms_batch1"] < row["pycaffe_ms_batch1"] for row in rows)
    print(f"ONNX Runtime (1 thread) faster than pycaffe at batch 1 on every network: {faster}")
    if args.out:
        summary = {"run": str(args.run), "cores": runtime.all_cores(), "ort_call_overhead_ms": overhead}
        atomic.write_json(args.out, {**summary, "rows": rows})


if __name__ == "__main__":
    main()
