"""Running and timing a network in a runtime: pycaffe (CPU) or ONNX Runtime (CPU execution provider).

Timings are medians of ``repeats`` forward passes after ``warmup`` passes, in this process, on a fixed
random input. ONNX Runtime runs with a given number of intra-op threads (1, or every core this process
may use) and one inter-op thread, with all graph optimisations on.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from caffe_evo.errors import CaffeEvoError

RUNTIMES = ("pycaffe", "onnxruntime")


def require(module: str) -> ModuleType:
    """``onnx`` or ``onnxruntime``, or one line saying how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CaffeEvoError(
            f"the {module} package is missing; `bash scripts/setup.sh` installs it (see requirements.txt)"
        ) from None


def all_cores() -> int:
    return len(os.sched_getaffinity(0))


def ort_session(model: Any, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session of ``model`` (a ModelProto or its bytes), ``threads`` intra-op threads."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    data = model if isinstance(model, bytes) else model.SerializeToString()
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for a model it cannot load
        raise CaffeEvoError(f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0]}") from None


def ort_forward(session: Any, feeds: dict[str, np.ndarray], batch: int = 256) -> dict[str, np.ndarray]:
    """Outputs by name, as float32, run ``batch`` samples at a time; inputs are cast to the model's type."""
    types = {i.name: np.float16 if i.type == "tensor(float16)" else np.float32 for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    total = len(next(iter(feeds.values())))
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, total, batch):
        chunk = {name: value[start : start + batch].astype(types[name]) for name, value in feeds.items()}
        for name, out in zip(names, session.run(names, chunk), strict=True):
            parts[name].append(out.astype(np.float32))
    return {name: np.concatenate(values) for name, values in parts.items()}


def caffe_forward(net: Any, feeds: dict[str, np.ndarray], batch: int = 256) -> dict[str, np.ndarray]:
    """pycaffe outputs of ``feeds``, run ``batch`` images at a time."""
    total = len(next(iter(feeds.values())))
    parts: dict[str, list[np.ndarray]] = {name: [] for name in net.outputs}
    for start in range(0, total, batch):
        chunk = {name: value[start : start + batch] for name, value in feeds.items()}
        for name, value in chunk.items():
            net.blobs[name].reshape(*value.shape)
        net.reshape()
        out = net.forward(**chunk)
        for name in net.outputs:
            parts[name].append(out[name].copy())
    return {name: np.concatenate(values) for name, values in parts.items()}


def median_ms(call: Callable[[], Any], repeats: int, warmup: int) -> float:
    if repeats < 1 or warmup < 0:
        raise CaffeEvoError(f"timing needs repeats >= 1 and warmup >= 0 (got {repeats}, {warmup})")
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds)) * 1000


def timing(batch: int, median: float, repeats: int) -> dict[str, Any]:
    return {"batch": batch, "repeats": repeats, "median_ms": median, "images_per_s": batch * 1000 / median}


def ort_latency(session: Any, batch: int, repeats: int = 30, warmup: int = 5) -> dict[str, Any]:
    """:func:`timing` of ONNX Runtime forward passes at ``batch`` images."""
    if batch < 1:
        raise CaffeEvoError(f"latency needs batch >= 1 (got {batch})")
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in session.get_inputs():
        dtype = np.float16 if spec.type == "tensor(float16)" else np.float32
        feeds[spec.name] = rng.standard_normal((batch, *spec.shape[1:])).astype(dtype)
    names = [o.name for o in session.get_outputs()]
    return timing(batch, median_ms(lambda: session.run(names, feeds), repeats, warmup), repeats)


def agreement(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, Any]:
    """How far ``got`` is from ``reference``, per output: the share of samples with the same top-1 class
    (over axis 1) and the largest difference relative to the output's largest magnitude."""
    result = {}
    for name, want in reference.items():
        have = got[name]
        scale = float(np.max(np.abs(want))) or 1.0
        same = np.argmax(want.reshape(len(want), want.shape[1], -1), axis=1) == np.argmax(
            have.reshape(len(have), have.shape[1], -1), axis=1
        )
        result[name] = {
            "samples": len(want),
            "top1_agreement": float(np.mean(same.all(axis=1))),
            "top1_disagreements": int(np.count_nonzero(~same.all(axis=1))),
            "max_abs_diff": float(np.max(np.abs(want - have))),
            "max_rel_diff": float(np.max(np.abs(want - have))) / scale,
        }
    return result


def bench_file(path: Path, batch: int, repeats: int, threads: int = 1) -> dict[str, Any]:
    """Time a deployment file: a TensorRT ``.engine`` on the GPU, or an ``.onnx`` model in ONNX Runtime."""
    path = Path(path)
    if not path.is_file():
        raise CaffeEvoError(f"{path}: file not found")
    if path.suffix == ".engine":
        from caffe_evo.deploy import tensorrt

        trt = tensorrt.require()
        return {"runtime": f"tensorrt {trt.__version__}", **tensorrt.time_engine(trt, path, batch, repeats)}
    if path.suffix != ".onnx":
        raise CaffeEvoError(f"{path}: expected a TensorRT .engine or an .onnx model")
    onnx = require("onnx")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError and others for a damaged file
        raise CaffeEvoError(f"{path}: not a readable ONNX model ({str(exc).splitlines()[0]})") from None
    session = ort_session(model, threads)
    return {"runtime": "onnxruntime", "threads": threads, **ort_latency(session, batch, repeats)}
