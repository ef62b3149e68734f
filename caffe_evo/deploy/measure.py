"""What evolution buys, measured: the compact network and the cost of both it and the masked full network.

For one generation folder: :func:`caffe_evo.deploy.compaction.compact` writes ``compact/``; then parameters,
synapses, clusters, multiply-accumulates per layer and in total, model file size, and CPU forward latency
at batch 1 and throughput at batch 64 (medians after warm-up, in this process) in pycaffe and in ONNX
Runtime (the fp32 ONNX export; one intra-op thread and all cores) are taken for the masked full network
and the compact one.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from caffe_evo import atomic, lineage, masking
from caffe_evo.caffe_env import caffe_pb2
from caffe_evo.dependency import WEIGHTED
from caffe_evo.deploy import compaction, onnx_export, runtime
from caffe_evo.errors import CaffeEvoError
from caffe_evo.recipe import DEPLOY_FILE, parse_prototxt
from caffe_evo.training import METRICS_FILE, WEIGHTS_FILE
from caffe_evo.weights import load_net

COMPACT_DIR = "compact"
STAGING_PREFIX = ".compact-staging-"
LATENCY_BATCH = 1
THROUGHPUT_BATCH = 64


def cost(deploy: Path, weights: Path | None = None) -> dict:
    """Parameters, synapses, clusters and multiply-accumulates per image, per layer and in total.

    Synapses are non-zero weights and clusters output channels with any; without ``weights`` every
    weight counts as living (the architecture's cost). MACs count Convolution and InnerProduct only.
    """
    weights = None if weights is None else Path(weights)
    return net_cost(load_net(Path(deploy), weights), weights)


def net_cost(net: Any, weights: Path | None) -> dict:
    """:func:`cost` of a net already loaded (from ``weights``, or None for the architecture alone)."""
    layers: dict[str, dict[str, Any]] = {}
    for name, blobs in net.params.items():
        kind = net.layer_dict[name].type
        entry: dict[str, Any] = {"type": kind, "params": sum(blob.data.size for blob in blobs)}
        if kind in WEIGHTED:
            w = blobs[0].data
            living = (w != 0 if weights is not None else np.ones(w.shape, dtype=bool)).reshape(len(w), -1)
            top_shape = net.blobs[net.top_names[name][0]].data.shape
            entry["synapses"] = int(np.count_nonzero(living))
            entry["clusters"] = int(np.count_nonzero(living.any(axis=1)))
            entry["macs"] = w.size * math.prod(top_shape[2:])
        layers[name] = entry
    keys = ("params", "synapses", "clusters", "macs")
    totals = {key: sum(layer.get(key, 0) for layer in layers.values()) for key in keys}
    result: dict[str, Any] = {"layers": layers, **totals}
    if weights is not None:
        result["file_bytes"] = weights.stat().st_size
    return result


def latency(
    deploy: Path,
    weights: Path,
    batch: int,
    repeats: int = 30,
    warmup: int = 5,
    runtime_name: str = "pycaffe",
    threads: int = 1,
) -> dict:
    """Median wall time of one CPU forward pass at ``batch`` images, after ``warmup`` passes, in
    ``runtime_name`` (pycaffe, or ONNX Runtime with ``threads`` intra-op threads on the net's ONNX export)."""
    net = load_net(Path(deploy), Path(weights))
    if runtime_name == "pycaffe":
        return net_latency(net, batch, repeats, warmup)
    if runtime_name == "onnxruntime":
        session = runtime.ort_session(onnx_export.convert(_proto(Path(deploy)), net), threads)
        return runtime.ort_latency(session, batch, repeats, warmup)
    raise CaffeEvoError(f"unknown runtime {runtime_name!r}; choose from {', '.join(runtime.RUNTIMES)}")


def net_latency(net: Any, batch: int, repeats: int = 30, warmup: int = 5) -> dict:
    """pycaffe's :func:`latency` of a net already loaded; the net's inputs are reshaped to ``batch``."""
    if batch < 1:
        raise CaffeEvoError(f"latency needs batch >= 1 (got {batch})")
    rng = np.random.default_rng(0)
    for name in net.inputs:
        net.blobs[name].reshape(batch, *net.blobs[name].data.shape[1:])
    net.reshape()
    for name in net.inputs:
        net.blobs[name].data[...] = rng.standard_normal(net.blobs[name].data.shape)
    return runtime.timing(batch, runtime.median_ms(net.forward, repeats, warmup), repeats)


def _proto(deploy: Path) -> Any:
    return parse_prototxt(deploy, caffe_pb2().NetParameter())


def ort_cost(model: Any, repeats: int) -> dict[str, Any]:
    """ONNX Runtime batch-1 latency and batch-64 throughput (fp32), with one intra-op thread (``ort_1t_*``)
    and with every core this process may use (``ort_all_*``)."""
    result: dict[str, Any] = {"ort_threads_all": runtime.all_cores()}
    for label, threads in (("1t", 1), ("all", runtime.all_cores())):
        session = runtime.ort_session(model, threads)
        single = runtime.ort_latency(session, LATENCY_BATCH, repeats=repeats)
        batch = runtime.ort_latency(session, THROUGHPUT_BATCH, repeats=max(5, repeats // 3))
        result.update(
            {
                f"ort_{label}_latency_ms_batch1": single["median_ms"],
                f"ort_{label}_fps_batch1": single["images_per_s"],
                f"ort_{label}_latency_ms_batch64": batch["median_ms"],
                f"ort_{label}_images_per_s_batch64": batch["images_per_s"],
            }
        )
    return result


def network_cost(deploy: Path, weights: Path, repeats: int) -> dict[str, Any]:
    """Static cost plus batch-1 latency and batch-64 throughput of one network, loaded once: pycaffe's, and
    ONNX Runtime's on its fp32 ONNX export."""
    net = load_net(deploy, weights)
    cost = net_cost(net, weights)  # before the reshapes below; MACs are per image anyway
    try:
        ort = ort_cost(onnx_export.convert(_proto(deploy), net), repeats)
    except CaffeEvoError as exc:  # a net ONNX cannot express is still measured in pycaffe
        ort = {"ort_unavailable": str(exc)}
    single = net_latency(net, LATENCY_BATCH, repeats=repeats)
    batch = net_latency(net, THROUGHPUT_BATCH, repeats=max(5, repeats // 3))
    return {
        **cost,
        "latency_ms_batch1": single["median_ms"],
        "fps_batch1": single["images_per_s"],
        "latency_ms_batch64": batch["median_ms"],
        "images_per_s_batch64": batch["images_per_s"],
        **ort,
    }


def measure(
    folder: Path, masks: dict[str, np.ndarray], repeats: int = 30, precision: str = "fp32"
) -> dict[str, Any]:
    """Compact ``folder`` into ``folder/compact`` (parameters in the run's ``precision``) and return the
    cost of both networks."""
    started = time.perf_counter()
    folder = Path(folder)
    summary = compaction.compact(
        folder / DEPLOY_FILE, folder / WEIGHTS_FILE, folder / COMPACT_DIR, masks, precision
    )
    compact_dir = folder / COMPACT_DIR
    full = network_cost(folder / DEPLOY_FILE, folder / WEIGHTS_FILE, repeats)
    small = network_cost(compact_dir / DEPLOY_FILE, compact_dir / WEIGHTS_FILE, repeats)
    return {
        "full": full,
        "compact": small,
        "compaction": {key: summary[key] for key in ("kept", "removed", "notes", "max_abs_diff", "rounding")},
        "measure_seconds": time.perf_counter() - started,
    }


def compact_generation(gen_dir: Path, repeats: int = 30) -> dict[str, Any]:
    """Rebuild ``gen_dir/compact`` and the ``cost`` entry of its metrics (``caffe-evo compact``)."""
    gen_dir = Path(gen_dir)
    metrics_path = gen_dir / METRICS_FILE
    for required in (METRICS_FILE, lineage.MASKS_FILE, DEPLOY_FILE, WEIGHTS_FILE):
        if not (gen_dir / required).is_file():
            raise CaffeEvoError(f"{gen_dir}: not a generation folder (no {required})")
    metrics = lineage.read_json(metrics_path)
    masks = masking.load(gen_dir / lineage.MASKS_FILE)
    # Measured in a staging folder, so that a failure leaves the generation as it was; a killed run's
    # staging folders are removed first.
    for leftover in gen_dir.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=gen_dir))
    try:
        for name in (DEPLOY_FILE, WEIGHTS_FILE):
            os.link(gen_dir / name, staging / name)
        cost = measure(staging, masks, repeats, metrics.get("precision", "fp32"))
        if (gen_dir / COMPACT_DIR).exists():
            shutil.rmtree(gen_dir / COMPACT_DIR)
        os.replace(staging / COMPACT_DIR, gen_dir / COMPACT_DIR)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    metrics = {**metrics, "cost": cost}
    atomic.write_json(metrics_path, metrics)
    return metrics
