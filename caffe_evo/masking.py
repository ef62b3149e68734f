"""Masked training: pruned synapses stay exactly 0.0 through every Caffe solver iteration.

The mask is enforced on the gradient, through Caffe's solver callback ``on_gradients_ready`` (after the
backward pass, before weight decay, momentum and the update). A pruned weight that is 0.0 with a zero
gradient gets zero weight decay and a momentum history that stays exactly zero, so it is never moved:
no per-iteration copy of the weights is needed, and every Caffe solver type (SGD, Nesterov, Adam, ...)
is covered.

A dead channel (a Convolution map or InnerProduct neuron without living synapses or bias) outputs 0, but
the BatchNorm and Scale layers after it would turn that 0 into a constant that a padded reader cannot
fold, so the channel could never leave the network. Their parameters for dead channels are masked too
(:func:`follower_masks`): BatchNorm's mean and variance and Scale's gamma and beta stay 0, and the channel
stays 0 after them.
"""

from __future__ import annotations

import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from caffe_evo import atomic
from caffe_evo.caffe_env import add_solver_callback
from caffe_evo.encoding import bias_mask
from caffe_evo.errors import CaffeEvoError

# layer name -> one 0/1 float32 array per learnable blob of the layer (weights, then bias)
ParamMasks = dict[str, list[np.ndarray]]


def from_weight_masks(weight_masks: dict[str, np.ndarray], net: Any) -> ParamMasks:
    """Per-blob masks: the weight mask, and a bias mask that keeps a neuron's bias iff it keeps a synapse."""
    masks: ParamMasks = {}
    for name, mask in weight_masks.items():
        if name not in net.params:
            raise CaffeEvoError(f"mask for layer '{name}', which the net does not have")
        blobs = net.params[name]
        if mask.shape != blobs[0].data.shape:
            raise CaffeEvoError(f"mask for layer '{name}' is {mask.shape}, its weights {blobs[0].data.shape}")
        per_blob = [mask.astype(np.float32)]
        if len(blobs) > 1:
            per_blob.append(bias_mask(mask).astype(np.float32))
        masks[name] = per_blob
    return masks


# Channel-wise layers whose parameters follow the channels of the layer they act on.
FOLLOWERS = ("BatchNorm", "Scale")


def followers(proto: Any) -> dict[str, list[tuple[str, str]]]:
    """Convolution/InnerProduct layer -> ``(name, type)`` of the BatchNorm and Scale layers that act on
    its output alone, in net order (a chain ends at the first other reader of the blob)."""
    chains: dict[str, list[tuple[str, str]]] = {}
    layers = list(proto.layer)
    for i, layer in enumerate(layers):
        if layer.type not in ("Convolution", "InnerProduct"):
            continue
        blob, chain = layer.top[0], []
        for other in layers[i + 1 :]:
            if blob not in other.bottom:
                continue
            if other.type not in FOLLOWERS or list(other.bottom) != [blob]:
                break
            chain.append((other.name, other.type))
            blob = other.top[0]
        chains[layer.name] = chain
    return chains


def follower_masks(
    weight_masks: dict[str, np.ndarray], proto: Any, blob_counts: dict[str, int]
) -> ParamMasks:
    """Masks of the BatchNorm (mean, variance; not its scale factor) and Scale parameters of every channel
    that ``weight_masks`` leave dead; ``blob_counts`` gives each layer's number of parameter blobs."""
    masks: ParamMasks = {}
    for name, chain in followers(proto).items():
        if name not in weight_masks:
            continue
        alive = bias_mask(weight_masks[name]).astype(np.float32)
        for layer, kind in chain:
            count = blob_counts[layer]
            masks[layer] = [alive, alive, np.ones(1, np.float32)] if kind == "BatchNorm" else [alive] * count
    return masks


def masked_params(
    params: dict[str, list[np.ndarray]], weight_masks: dict[str, np.ndarray], proto: Any
) -> dict[str, list[np.ndarray]]:
    """``params`` (numpy blobs by layer) with the followers of dead channels masked as training masks them."""
    masks = follower_masks(weight_masks, proto, {name: len(blobs) for name, blobs in params.items()})
    return {
        name: [blob * mask for blob, mask in zip(blobs, masks[name], strict=True)] if name in masks else blobs
        for name, blobs in params.items()
    }


def blob_mask_pairs(net: Any, masks: ParamMasks) -> list[tuple[Any, np.ndarray]]:
    """``(pycaffe blob, mask)`` for every masked parameter blob of ``net``."""
    return [
        (blob, mask)
        for name, per_blob in masks.items()
        for blob, mask in zip(net.params[name], per_blob, strict=True)
    ]


def apply(net: Any, masks: ParamMasks) -> None:
    """Zero the masked weights and biases of ``net`` in place."""
    for blob, mask in blob_mask_pairs(net, masks):
        blob.data[...] *= mask


def violations(net: Any, masks: ParamMasks) -> int:
    """Number of masked-out parameters of ``net`` that are not exactly 0.0."""
    return sum(int(np.count_nonzero(blob.data[mask == 0])) for blob, mask in blob_mask_pairs(net, masks))


class GradientMask:
    """Solver callback pair that zeroes the gradients of masked parameters; times its own work."""

    def __init__(self, net: Any, masks: ParamMasks) -> None:
        self._pairs = blob_mask_pairs(net, masks)
        self.seconds = 0.0

    def on_start(self) -> None:
        """Caffe calls this before each forward/backward; nothing to do there."""

    def on_gradients_ready(self) -> None:
        start = time.perf_counter()
        for blob, mask in self._pairs:
            blob.diff[...] *= mask
        self.seconds += time.perf_counter() - start

    def attach(self, solver: Any) -> GradientMask:
        add_solver_callback(solver, self)
        return self


def save(path: Path, weight_masks: dict[str, np.ndarray]) -> None:
    """Store weight masks as a compressed ``.npz`` (bool arrays keyed by layer name), atomically."""
    with atomic.atomic_path(Path(path)) as tmp, tmp.open("wb") as fh:
        np.savez_compressed(fh, **{name: mask.astype(bool) for name, mask in weight_masks.items()})


def load(path: Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise CaffeEvoError(f"{path}: mask file not found")
    try:
        with np.load(path) as data:
            return {name: data[name].astype(bool) for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CaffeEvoError(f"{path}: not a valid mask file ({exc})") from None
