"""Masked training: pruned synapses stay exactly 0.0 through every Caffe solver iteration.

The mask is enforced on the gradient, through Caffe's solver callback ``on_gradients_ready`` (after the
backward pass, before weight decay, momentum and the update). A pruned weight that is 0.0 with a zero
gradient gets zero weight decay and a momentum history that stays exactly zero, so it is never moved:
no per-iteration copy of the weights is needed, and every Caffe solver type (SGD, Nesterov, Adam, ...)
is covered.
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
