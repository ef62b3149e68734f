"""Compaction: rewrite a masked network as a smaller dense Caffe network that computes the same function.

A mask makes nothing faster (METHOD.md section 6): Caffe multiplies the zeros all the same. Compaction
removes dead clusters physically: a Convolution/InnerProduct output channel leaves the network, with the
matching input channels of every consumer, when no reader needs it (:class:`caffe_evo.dependency.ChannelGraph`
decides which), and constants that readers fold are added to their biases.

The compact network is checked before it is published: it and the masked network run on the same random
input and must agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from caffe_evo import atomic, masking
from caffe_evo.caffe_env import caffe_pb2, load_caffe
from caffe_evo.dependency import ChannelGraph, Step, check_supported
from caffe_evo.errors import CaffeEvoError
from caffe_evo.precision import FORMATS
from caffe_evo.precision import export as export_weights
from caffe_evo.recipe import DEPLOY_FILE, parse_prototxt, to_prototxt
from caffe_evo.training import WEIGHTS_FILE
from caffe_evo.weights import load_net

# The self-check allows float32 rounding (folded biases are summed in another order than Caffe's) and,
# in a restricted run, the rounding of folded biases to the run's format (half a unit in its last place).
_SELF_CHECK_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-3, "bf16": 2e-2}


def _rewrite(
    graph: ChannelGraph, proto: Any
) -> tuple[Any, dict[str, list[np.ndarray]], dict[str, dict[str, Any]]]:
    """The compact NetParameter, its parameter blobs by layer, and per-layer channel counts."""
    compact = type(proto)()
    compact.CopyFrom(proto)
    del compact.layer[:]
    params: dict[str, list[np.ndarray]] = {}
    layers: dict[str, dict[str, Any]] = {}
    for step in graph.steps:
        layer = compact.layer.add()
        layer.CopyFrom(step.layer)
        if step.blocking is not None:
            params[layer.name], layers[layer.name] = _rewrite_weighted(graph, step, layer)
        elif step.params:  # channel-wise parameters (BatchNorm's scale factor is not one of them)
            bottom = step.bottoms[0]
            keep = graph.keep(bottom)
            params[layer.name] = [p[keep] if p.shape == (bottom.channels,) else p.copy() for p in step.params]
    return compact, params, layers


def _rewrite_weighted(graph: ChannelGraph, step: Step, layer: Any) -> tuple[list[np.ndarray], dict[str, Any]]:
    bottom, out = step.bottoms[0], step.params[0].shape[0]
    keep_in, keep_out = graph.keep(bottom), graph.keep(step.tops[0])
    weights, rows = step.params[0], np.flatnonzero(keep_out)
    param = layer.convolution_param if layer.type == "Convolution" else layer.inner_product_param
    removed = ~keep_in[step.fold]
    delta = step.fold_sums[:, removed] @ bottom.const[step.fold[removed]]
    if layer.type == "Convolution":  # kept inputs are balanced: as many per group, in group order
        per_group = bottom.channels // param.group
        local = np.flatnonzero(keep_in).reshape(param.group, -1) % per_group
        new_weights = weights[rows[:, None], local[rows // (out // param.group)]]
    else:
        columns = (np.flatnonzero(keep_in)[:, None] * bottom.inner + np.arange(bottom.inner)).ravel()
        new_weights = weights[rows][:, columns]
    bias = step.params[1].astype(np.float64) if param.bias_term else np.zeros(out)
    new_bias = (bias + delta)[rows]
    blobs = [new_weights]
    if not param.bias_term and new_bias.any():  # a folded constant needs a bias where there was none
        param.bias_term = True
    if param.bias_term:
        blobs.append(new_bias.astype(np.float32))
    param.num_output = len(rows)
    counts = {
        "type": layer.type,
        "channels": out,
        "kept": len(rows),
        "removed": out - len(rows),
        "folded": int(np.count_nonzero(step.fold_sums[:, removed].any(axis=0))),
    }
    return blobs, counts


def _count_params(net: Any) -> int:
    return sum(blob.data.size for blobs in net.params.values() for blob in blobs)


def _round(params: dict[str, list[np.ndarray]], precision: str) -> dict[str, Any]:
    """Round the compact parameters to the run's format in place: the masked net's values already are,
    but a folded bias is a new float32 sum. Returns how many values rounding changed, and by how much."""
    if precision == "fp32":
        return {"precision": precision, "changed": 0, "max_abs_change": 0.0}
    rounding, changed, worst = FORMATS[precision], 0, 0.0
    for blobs in params.values():
        for i, values in enumerate(blobs):
            rounded = rounding(values.astype(np.float32))
            if not np.isfinite(rounded).all():
                raise CaffeEvoError(f"a folded bias overflows {precision}: the restricted net cannot hold it")
            changed += int(np.count_nonzero(rounded != values))
            worst = max(worst, float(np.max(np.abs(rounded - values), initial=0.0)))
            blobs[i] = rounded
    return {"precision": precision, "changed": changed, "max_abs_change": worst}


def _self_check(full: Any, small: Any, precision: str) -> float:
    """Largest output difference of the two nets on one random input; a real difference is a bug here."""
    rng = np.random.default_rng(0)
    feed = {name: rng.standard_normal(full.blobs[name].data.shape).astype(np.float32) for name in full.inputs}
    full.forward(**feed)
    small.forward(**feed)
    worst = 0.0
    for name in full.outputs:
        want, got = full.blobs[name].data, small.blobs[name].data
        diff = float(np.max(np.abs(want - got)))
        if not diff <= _SELF_CHECK_TOLERANCE[precision] * max(1.0, float(np.max(np.abs(want)))):
            raise CaffeEvoError(f"compaction changed output '{name}' by up to {diff:.3g}: a caffe-evo bug")
        worst = max(worst, diff)
    return worst


def compact(
    deploy: Path,
    weights: Path,
    out_dir: Path,
    masks: dict[str, np.ndarray] | None = None,
    precision: str = "fp32",
) -> dict:
    """Write ``out_dir/deploy.prototxt`` and ``out_dir/weights.caffemodel``: same function, fewer channels.

    In a restricted run (``precision`` fp16 or bf16) the compact parameters are rounded to that format
    and ``out_dir/weights_<precision>.npz`` holds them in it, keyed by the compact net's layers (the
    generation's own ``weights_<precision>.npz`` stays that of the masked full net).

    ``masks`` (bool, weight-shaped, by layer) are applied first as masked training applies them (pruned
    synapses, and the bias of a neuron without living synapses, become 0); without them the zeros in the
    weights are the dead synapses. Returns per-layer channel counts (``folded``: removed input channels
    whose constant went into the layer's bias), totals, parameter counts, notes on channels kept for
    structural reasons, and ``max_abs_diff`` of the self-check.
    """
    deploy, weights, out_dir = Path(deploy), Path(weights), Path(out_dir)
    if out_dir.exists():
        raise CaffeEvoError(f"{out_dir} exists; compaction writes a new folder")
    proto = parse_prototxt(deploy, caffe_pb2().NetParameter())
    check_supported(proto, deploy)
    full = load_net(deploy, weights)
    if masks is not None:
        masking.apply(full, masking.from_weight_masks(masks, full))
    graph = ChannelGraph(proto, full)
    graph.decide()
    compact_proto, params, layers = _rewrite(graph, proto)
    rounded = _round(params, precision)
    caffe = load_caffe()
    with atomic.atomic_path(out_dir, directory=True) as tmp:
        (tmp / DEPLOY_FILE).write_text(to_prototxt(compact_proto))
        small = caffe.Net(str(tmp / DEPLOY_FILE), caffe.TEST)
        for name, blobs in params.items():
            for blob, values in zip(small.params[name], blobs, strict=True):
                blob.data[...] = values
        small.save(str(tmp / WEIGHTS_FILE))
        if precision != "fp32":
            export_weights(small, tmp / f"weights_{precision}.npz", precision)
        max_abs_diff = _self_check(full, small, precision)
    return {
        "layers": layers,
        "channels": sum(layer["channels"] for layer in layers.values()),
        "kept": sum(layer["kept"] for layer in layers.values()),
        "removed": sum(layer["removed"] for layer in layers.values()),
        "params_before": _count_params(full),
        "params_after": _count_params(small),
        "notes": graph.notes,
        "max_abs_diff": max_abs_diff,
        "rounding": rounded,
    }
