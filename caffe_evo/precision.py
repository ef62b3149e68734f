"""Synaptic precision restriction (Shafiee, Li & Wong 2017), imposed after each generation's training.

Training stays fp32. Afterwards every weight and bias is rounded to the restricted format, and that
network is what is evaluated, stored and encoded for the next generation. The stored caffemodel keeps
fp32 blobs holding exactly representable values, so BVLC Caffe reads it; :func:`export` writes the
half-precision copy for deployment: ``gen_NNN/weights_<format>.npz`` for the masked full network (keys of
its ``deploy.prototxt``), and compaction writes ``gen_NNN/compact/weights_<format>.npz`` for the compact
one (keys of the compact ``deploy.prototxt``), each beside the network it belongs to.

BatchNorm stores its running sums multiplied by a scale factor (about 1,000 after a long training run),
so a variance above about 65 would overflow fp16 as stored: its statistics are restricted as the
statistics (the stored sums divided by the factor), and stored with a factor of 1, which is what
:func:`caffe_evo.batchnorm.reestimate` leaves anyway.

A format is a function from fp32 values to their rounded fp32 values; add one to :data:`FORMATS`
(e.g. int8 with a per-layer scale) and the rest of the pipeline follows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from caffe_evo import atomic, batchnorm
from caffe_evo.errors import CaffeEvoError

FP16_MAX = float(np.finfo(np.float16).max)


def _round_fp16(values: np.ndarray) -> np.ndarray:
    """IEEE binary16, round-to-nearest-even (numpy's float32 -> float16 cast), back to fp32."""
    with np.errstate(over="ignore"):
        return values.astype(np.float16).astype(np.float32)


def _round_bf16(values: np.ndarray) -> np.ndarray:
    """bfloat16 (the top 16 bits of fp32), round-to-nearest-even on the dropped 16 bits."""
    bits = values.astype(np.float32).view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    rounded = ((bits + rounding) & np.uint32(0xFFFF0000)).astype(np.uint32)
    return rounded.view(np.float32)


FORMATS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"fp16": _round_fp16, "bf16": _round_bf16}
CHOICES = ("fp32", *FORMATS)


@dataclass
class RestrictionReport:
    """What rounding did to one network: values that overflowed and living values flushed to zero."""

    precision: str
    overflow: int = 0
    flushed_to_zero: int = 0
    max_abs_change: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "overflow": self.overflow,
            "flushed_to_zero": self.flushed_to_zero,
            "max_abs_change": self.max_abs_change,
        }

    def plus(self, other: RestrictionReport) -> RestrictionReport:
        """The report of two restrictions of one network, one after the other."""
        return RestrictionReport(
            self.precision,
            self.overflow + other.overflow,
            self.flushed_to_zero + other.flushed_to_zero,
            max(self.max_abs_change, other.max_abs_change),
        )


def check_choice(precision: str) -> None:
    if precision not in CHOICES:
        raise CaffeEvoError(f"unknown precision {precision!r}; choose from {', '.join(CHOICES)}")


def restrict_net(net: Any, precision: str) -> RestrictionReport:
    """Round every parameter blob of the pycaffe ``net`` in place.

    Overflow is an error, not a silent clip: a weight beyond the format's range would become infinite.
    """
    check_choice(precision)
    report = RestrictionReport(precision)
    if precision == "fp32":
        return report
    rounding = FORMATS[precision]
    for name in batchnorm.layers_of_type(net, batchnorm.BATCHNORM):
        blobs = net.params[name]
        mean, variance = batchnorm.statistics(blobs)
        blobs[0].data[...], blobs[1].data[...], blobs[2].data[...] = mean, variance, 1.0
    for name, blobs in net.params.items():
        for i, blob in enumerate(blobs):
            original = blob.data.copy()
            rounded = rounding(original)
            overflow = int(np.count_nonzero(~np.isfinite(rounded) & np.isfinite(original)))
            if overflow:
                raise CaffeEvoError(
                    f"{precision} restriction overflows layer '{name}' blob {i}: {overflow} values beyond "
                    f"the format's range (largest |w| {np.abs(original).max():.6g})"
                )
            report.flushed_to_zero += int(np.count_nonzero((rounded == 0) & (original != 0)))
            report.max_abs_change = max(report.max_abs_change, float(np.abs(rounded - original).max()))
            blob.data[...] = rounded
    return report


def export(net: Any, path: Path, precision: str) -> None:
    """Write the net's (already restricted) parameters as a deployment ``.npz`` in the native dtype.

    Keys are ``<layer>/<blob index>``; fp16 arrays are ``float16``, bf16 are the raw ``uint16`` bits.
    """
    arrays = {}
    for name, blobs in net.params.items():
        for i, blob in enumerate(blobs):
            if precision == "fp16":
                arrays[f"{name}/{i}"] = blob.data.astype(np.float16)
            else:
                arrays[f"{name}/{i}"] = (blob.data.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    with atomic.atomic_path(Path(path)) as tmp, tmp.open("wb") as fh:
        np.savez(fh, **arrays)
