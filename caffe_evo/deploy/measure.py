"""What evolution buys, measured: the compact network and the cost of both it and the masked full network.

For one generation folder: :func:`caffe_evo.deploy.compaction.compact` writes ``compact/``; then parameters,
synapses, clusters, multiply-accumulates per layer and in total, model file size, and Caffe CPU forward
latency at batch 1 and throughput at batch 64 (medians after warm-up, in this process) are taken for the
masked full network and the compact one.
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
from caffe_evo.dependency import WEIGHTED
from caffe_evo.deploy import compaction
from caffe_evo.errors import CaffeEvoError
from caffe_evo.recipe import DEPLOY_FILE
from caffe_evo.training import METRICS_FILE, WEIGHTS_FILE
from caffe_evo.weights import load_net

COMPACT_DIR = "compact"
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


def latency(deploy: Path, weights: Path, batch: int, repeats: int = 30, warmup: int = 5) -> dict:
    """Median wall time of one pycaffe CPU forward pass at ``batch`` images, after ``warmup`` passes."""
    return net_latency(load_net(Path(deploy), Path(weights)), batch, repeats, warmup)


def net_latency(net: Any, batch: int, repeats: int = 30, warmup: int = 5) -> dict:
    """:func:`latency` of a net already loaded; the net's inputs are reshaped to ``batch``."""
    if batch < 1 or repeats < 1 or warmup < 0:
        raise CaffeEvoError(
            f"latency needs batch >= 1, repeats >= 1, warmup >= 0 (got {batch}, {repeats}, {warmup})"
        )
    rng = np.random.default_rng(0)
    for name in net.inputs:
        net.blobs[name].reshape(batch, *net.blobs[name].data.shape[1:])
    net.reshape()
    for name in net.inputs:
        net.blobs[name].data[...] = rng.standard_normal(net.blobs[name].data.shape)
    for _ in range(warmup):
        net.forward()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        net.forward()
        seconds.append(time.perf_counter() - start)
    median_ms = float(np.median(seconds)) * 1000
    return {
        "batch": batch,
        "repeats": repeats,
        "median_ms": median_ms,
        "images_per_s": batch * 1000 / median_ms,
    }


def network_cost(deploy: Path, weights: Path, repeats: int) -> dict[str, Any]:
    """Static cost plus batch-1 latency and batch-64 throughput of one network, loaded once."""
    net = load_net(deploy, weights)
    cost = net_cost(net, weights)  # before the reshapes below; MACs are per image anyway
    single = net_latency(net, LATENCY_BATCH, repeats=repeats)
    batch = net_latency(net, THROUGHPUT_BATCH, repeats=max(5, repeats // 3))
    return {
        **cost,
        "latency_ms_batch1": single["median_ms"],
        "fps_batch1": single["images_per_s"],
        "latency_ms_batch64": batch["median_ms"],
        "images_per_s_batch64": batch["images_per_s"],
    }


def measure(folder: Path, masks: dict[str, np.ndarray], repeats: int = 30) -> dict[str, Any]:
    """Compact ``folder`` into ``folder/compact`` and return the cost of both networks."""
    started = time.perf_counter()
    folder = Path(folder)
    summary = compaction.compact(folder / DEPLOY_FILE, folder / WEIGHTS_FILE, folder / COMPACT_DIR, masks)
    compact_dir = folder / COMPACT_DIR
    full = network_cost(folder / DEPLOY_FILE, folder / WEIGHTS_FILE, repeats)
    small = network_cost(compact_dir / DEPLOY_FILE, compact_dir / WEIGHTS_FILE, repeats)
    return {
        "full": full,
        "compact": small,
        "compaction": {key: summary[key] for key in ("kept", "removed", "notes", "max_abs_diff")},
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
    # Measured in a staging folder, so that a failure leaves the generation as it was.
    staging = Path(tempfile.mkdtemp(prefix=".compact-staging-", dir=gen_dir))
    try:
        for name in (DEPLOY_FILE, WEIGHTS_FILE):
            os.link(gen_dir / name, staging / name)
        cost = measure(staging, masks, repeats)
        if (gen_dir / COMPACT_DIR).exists():
            shutil.rmtree(gen_dir / COMPACT_DIR)
        os.replace(staging / COMPACT_DIR, gen_dir / COMPACT_DIR)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    metrics = {**metrics, "cost": cost}
    atomic.write_json(metrics_path, metrics)
    return metrics
