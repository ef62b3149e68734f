"""``caffe-evo export``: a generation's compact network as ONNX (and a TensorRT engine), checked before
it is published.

``GEN/deploy/`` holds ``model.onnx`` (fp32), with ``--precision fp16`` also ``model_fp16.onnx``, with
``--format trt`` also ``model_fp16.engine``. Before the folder is renamed into place, every model runs in
ONNX Runtime on the same inputs as pycaffe: the recipe's test images (the first :data:`CHECK_IMAGES` of
the test LMDB that the generation's ``train_val.prototxt`` reads, transformed as it transforms them), or,
for a net whose input is not such an image, a fixed-seed random batch (recorded as such). The fp32 model
must give pycaffe's top-1 class on every input and outputs within :data:`FP32_TOLERANCE` of pycaffe's
relative to their largest magnitude; the fp16 model is compared with the Caffe net whose weights are
rounded to fp16, within :data:`FP16_TOLERANCE`. ``metrics.json`` records the agreement under ``deploy``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from caffe_evo import atomic, lineage, precision
from caffe_evo.caffe_env import caffe_pb2
from caffe_evo.deploy import onnx_export, runtime
from caffe_evo.errors import CaffeEvoError
from caffe_evo.recipe import DEPLOY_FILE, TRAIN_VAL_FILE, parse_prototxt
from caffe_evo.training import METRICS_FILE, WEIGHTS_FILE
from caffe_evo.weights import load_net

COMPACT_DIR = "compact"
DEPLOY_DIR = "deploy"
ONNX_FILE = "model.onnx"
ONNX_FP16_FILE = "model_fp16.onnx"
ENGINE_FILE = "model_fp16.engine"
FORMATS = ("onnx", "trt")
CHECK_IMAGES = 500
FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 2e-2  # fp16 keeps 11 significant bits; a few layers of fp16 sums lose a few more
ENGINE_BATCH = 64


def test_images(
    train_val: Path, shape: tuple[int, ...], count: int | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """The first ``count`` (None: all) images and labels of the test LMDB that ``train_val`` reads in its
    TEST phase (stage ``test`` if there is one), transformed as its Data layer does; None if there is no
    such layer or its images do not have the input's ``shape`` (C, H, W)."""
    from data_prep.lmdb_io import iter_datum_lmdb

    if not train_val.is_file():
        return None
    pb2 = caffe_pb2()
    proto = parse_prototxt(train_val, pb2.NetParameter())
    candidates = []
    for layer in proto.layer:
        phases = [rule for rule in layer.include if rule.phase == pb2.TEST]
        if layer.type == "Data" and phases:
            candidates.append((0 if any("test" in rule.stage for rule in phases) else 1, layer))
    if not candidates:
        return None
    layer = min(candidates, key=lambda c: c[0])[1]
    transform = layer.transform_param
    if transform.crop_size or transform.mean_file or transform.mirror:
        return None
    images, labels = [], []
    for _, image, label in iter_datum_lmdb(Path(layer.data_param.source)):
        if image.shape != shape:
            return None
        images.append(image)
        labels.append(label)
        if count is not None and len(images) == count:
            break
    if not images:
        return None
    data = np.stack(images).astype(np.float32)
    if transform.mean_value:
        mean = np.asarray(transform.mean_value, dtype=np.float32)
        data -= mean.reshape(-1, 1, 1) if len(mean) > 1 else mean[0]
    return data * transform.scale, np.asarray(labels)


def check_inputs(
    gen_dir: Path, net: Any, count: int | None = CHECK_IMAGES
) -> tuple[dict[str, np.ndarray], np.ndarray | None, str]:
    """Inputs for the self-check: real test images for a net of one image input, else a random batch."""
    if len(net.inputs) == 1:
        name = net.inputs[0]
        found = test_images(gen_dir / TRAIN_VAL_FILE, tuple(net.blobs[name].data.shape[1:]), count)
        if found is not None:
            images, labels = found
            return {name: images}, labels, f"{len(images)} test images of the recipe's test set"
    rng = np.random.default_rng(0)
    batch = 16
    feeds = {
        name: rng.standard_normal((batch, *net.blobs[name].data.shape[1:])).astype(np.float32)
        for name in net.inputs
    }
    return (
        feeds,
        None,
        f"a fixed-seed random batch of {batch} (standard normal, seed 0): no test images fit the input",
    )


def _compare(label: str, reference: dict, got: dict, tolerance: float, exact_top1: bool) -> dict[str, Any]:
    result = runtime.agreement(reference, got)
    for name, entry in result.items():
        if entry["max_rel_diff"] > tolerance or (exact_top1 and entry["top1_disagreements"]):
            raise CaffeEvoError(
                f"the {label} ONNX model differs from pycaffe on output '{name}' (max relative difference "
                f"{entry['max_rel_diff']:.3g}, limit {tolerance:g}; {entry['top1_disagreements']} of "
                f"{entry['samples']} top-1 classes differ): a caffe-evo bug; nothing was written"
            )
    return result


def export_generation(
    gen_dir: Path,
    fmt: str = "onnx",
    model_precision: str = "fp32",
    opset: int = onnx_export.DEFAULT_OPSET,
    io_precision: str = "fp32",
) -> dict[str, Any]:
    """Write ``gen_dir/deploy/`` (see the module docstring) and return the ``deploy`` entry of its metrics."""
    gen_dir = Path(gen_dir)
    if fmt not in FORMATS:
        raise CaffeEvoError(f"--format {fmt!r}: choose from {', '.join(FORMATS)}")
    if fmt == "trt" and model_precision != "fp16":
        raise CaffeEvoError("--format trt builds fp16 engines: add --precision fp16")
    onnx_export.ExportOptions(opset, model_precision, io_precision).check()
    fp16 = model_precision == "fp16"
    options = onnx_export.ExportOptions(opset=opset, precision="fp32")
    options_fp16 = onnx_export.ExportOptions(opset=opset, precision="fp16", io_precision=io_precision)
    trt = None
    if fmt == "trt":
        from caffe_evo.deploy import tensorrt

        trt = tensorrt.require()  # before any work: one line if TensorRT or a CUDA binding is missing
    compact_dir = gen_dir / COMPACT_DIR
    if not (gen_dir / METRICS_FILE).is_file():
        raise CaffeEvoError(f"{gen_dir}: not a generation folder (no {METRICS_FILE})")
    if not (compact_dir / DEPLOY_FILE).is_file():
        raise CaffeEvoError(
            f"{gen_dir}: no compact network in {compact_dir}; run `caffe-evo compact {gen_dir}` first"
        )
    deploy, weights = compact_dir / DEPLOY_FILE, compact_dir / WEIGHTS_FILE
    proto = parse_prototxt(deploy, caffe_pb2().NetParameter())
    net = load_net(deploy, weights)
    feeds, _, described = check_inputs(gen_dir, net)
    model = onnx_export.convert(proto, net, options)
    reference = runtime.caffe_forward(net, feeds)
    entry: dict[str, Any] = {
        "opset": opset,
        "check_inputs": described,
        "onnx": {
            "file": ONNX_FILE,
            "precision": "fp32",
            "agreement": _compare(
                "fp32",
                reference,
                runtime.ort_forward(runtime.ort_session(model), feeds),
                FP32_TOLERANCE,
                True,
            ),
        },
    }
    files = {ONNX_FILE: model.SerializeToString()}
    if fp16:
        restricted = load_net(deploy, weights)
        precision.restrict_net(restricted, "fp16")  # the same weights as the fp16 model, computed in fp32
        model16 = onnx_export.convert(proto, restricted, options_fp16)
        got = runtime.ort_forward(runtime.ort_session(model16), feeds)
        entry["onnx_fp16"] = {
            "file": ONNX_FP16_FILE,
            "precision": "fp16",
            "io_precision": io_precision,
            "reference": "pycaffe with the weights rounded to fp16",
            "agreement": _compare(
                "fp16", runtime.caffe_forward(restricted, feeds), got, FP16_TOLERANCE, False
            ),
        }
        files[ONNX_FP16_FILE] = model16.SerializeToString()
    out = gen_dir / DEPLOY_DIR
    with atomic.atomic_path(out, directory=True) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        if trt is not None:
            entry["trt"] = _engine(trt, compact_dir, tmp, net)
    metrics = lineage.read_json(gen_dir / METRICS_FILE)
    atomic.write_json(gen_dir / METRICS_FILE, {**metrics, "deploy": entry})
    return entry


def _engine(trt: Any, compact_dir: Path, deploy_dir: Path, net: Any) -> dict[str, Any]:
    from caffe_evo.deploy import tensorrt

    route = tensorrt.choose_route(trt.__version__, "fp16", hasattr(trt.BuilderFlag, "FP16"))
    shape = tuple(net.blobs[net.inputs[0]].data.shape)
    engine = tensorrt.build_engine(
        trt, route, compact_dir, deploy_dir, list(net.outputs), shape, ENGINE_BATCH
    )
    (deploy_dir / ENGINE_FILE).write_bytes(engine)
    return {
        "file": ENGINE_FILE,
        "tensorrt": trt.__version__,
        "route": route.__dict__,
        "max_batch": ENGINE_BATCH,
    }
