"""Exact re-estimation of BatchNorm statistics after training, and the BatchNorm layers of a net.

Caffe's BatchNorm keeps an exponential moving average of its batch statistics (``moving_average_fraction``,
0.999 by default). An offspring inherits its parent's averages, which describe the unpruned parent, and a
short fine-tune barely moves them, so its TEST-phase accuracy can fall far below what the network does
with the statistics of its own activations. After every training run the statistics are therefore
computed anew with the final weights: the training net runs forward over ``batches`` training batches
(TRAIN phase, so every BatchNorm normalises with its batch's statistics, as in training), and each layer
stores the plain average of the per-batch means and variances, as precise-BN methods do. The blobs then
hold the statistics themselves with a scale factor of 1 (Caffe divides by the factor), so they can be
restricted to fp16 as statistics (:mod:`caffe_evo.precision`).

The per-batch values are read off Caffe's own update: zeroing a layer's three blobs before a forward pass
leaves exactly that batch's mean, its (m/(m-1)-corrected) variance and a factor of 1 in them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

BATCHNORM = "BatchNorm"


def layers_of_type(net: Any, kind: str) -> list[str]:
    """Names of the layers of the pycaffe ``net`` with this type, in net order."""
    return [name for name, layer in zip(net._layer_names, net.layers, strict=True) if layer.type == kind]


@dataclass
class Reestimation:
    """What one re-estimation did: for the run's ``metrics.json``."""

    layers: int
    batches: int
    images: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "batches": self.batches,
            "images": self.images,
            "seconds": self.seconds,
        }

    def plus(self, other: Reestimation | None) -> Reestimation:
        """Two re-estimations of one net (before and after precision restriction), as one recorded step."""
        if other is None:
            return self
        return Reestimation(
            self.layers,
            self.batches + other.batches,
            self.images + other.images,
            round(self.seconds + other.seconds, 3),
        )


def reestimate(net: Any, batches: int) -> Reestimation | None:
    """Replace the BatchNorm statistics of the TRAIN-phase pycaffe ``net`` by their average over the next
    ``batches`` training batches; None when the net has no BatchNorm (nothing is run)."""
    names = layers_of_type(net, BATCHNORM)
    if not names or batches <= 0:
        return None
    started = time.perf_counter()
    sums = {
        name: [np.zeros(net.params[name][i].data.shape, dtype=np.float64) for i in (0, 1)] for name in names
    }
    images = 0
    for _ in range(batches):
        for name in names:
            for blob in net.params[name]:
                blob.data[...] = 0.0
        net.forward()
        images += net.blobs[net.bottom_names[names[0]][0]].data.shape[0]
        for name in names:
            for i in (0, 1):
                sums[name][i] += net.params[name][i].data
    for name in names:
        mean, variance, factor = net.params[name]
        mean.data[...] = sums[name][0] / batches
        variance.data[...] = sums[name][1] / batches
        factor.data[...] = 1.0
    return Reestimation(len(names), batches, images, round(time.perf_counter() - started, 3))


def statistics(blobs: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """The mean and variance that a BatchNorm layer's three stored blobs stand for (Caffe's division)."""
    factor = float(blobs[2].data.ravel()[0])
    scale = 0.0 if factor == 0 else 1.0 / factor
    return blobs[0].data * scale, blobs[1].data * scale


def folded_weights(
    weights: dict[str, np.ndarray], params: dict[str, list[np.ndarray]], proto: Any
) -> dict[str, np.ndarray]:
    """``weights`` with each output map scaled by what the BatchNorm and Scale after its layer multiply it
    by, ``|gamma| / sqrt(var + eps)`` (a layer without them is unchanged): the map's effective strength."""
    from caffe_evo.masking import followers

    eps = {layer.name: layer.batch_norm_param.eps for layer in proto.layer if layer.type == BATCHNORM}
    folded = {}
    for name, w in weights.items():
        factor = np.ones(w.shape[0])
        for layer, kind in followers(proto).get(name, []):
            blobs = params[layer]
            if kind == BATCHNORM:
                scale = 0.0 if blobs[2][0] == 0 else 1.0 / float(blobs[2][0])
                factor /= np.sqrt(blobs[1].astype(np.float64) * scale + eps[layer])
            else:
                factor *= np.abs(blobs[0].astype(np.float64))
        folded[name] = w * factor.reshape((-1,) + (1,) * (w.ndim - 1))
    return folded
