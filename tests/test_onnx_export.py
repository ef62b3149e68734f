"""ONNX export on real pycaffe and real ONNX Runtime: every layer type alone and together, pooling's corner
cases, the fixtures' AlexNet-, ResNet- and Concat-shaped nets, and an evolved LeNet-5 on MNIST test images."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import no_partials, short_eval_recipe
from test_compaction import FIXTURES, random_net

from caffe_evo.caffe_env import caffe_pb2, load_caffe
from caffe_evo.deploy import onnx_export, runtime
from caffe_evo.deploy.export import check_inputs, export_generation
from caffe_evo.errors import CaffeEvoError
from caffe_evo.evolution import EvolutionConfig, start
from caffe_evo.recipe import parse_prototxt
from caffe_evo.weights import load_net

TOLERANCE = 1e-5


def net_of(tmp_path: Path, layers: str, shape: tuple[int, ...] = (1, 6, 7, 7), seed: int = 0) -> Path:
    deploy = tmp_path / "net.prototxt"
    dims = " ".join(f"dim: {d}" for d in shape)
    deploy.write_text(
        f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}\n{layers}'
    )
    return deploy


def compare(deploy: Path, net: Any, options: onnx_export.ExportOptions | None = None, batch: int = 3) -> Any:
    """Export, run both on one random batch, and require ONNX Runtime to give pycaffe's outputs."""
    proto = parse_prototxt(deploy, caffe_pb2().NetParameter())
    model = onnx_export.convert(proto, net, options)
    rng = np.random.default_rng(1)
    feeds = {
        n: rng.standard_normal((batch, *net.blobs[n].data.shape[1:])).astype(np.float32) for n in net.inputs
    }
    want = runtime.caffe_forward(net, feeds)
    got = runtime.ort_forward(runtime.ort_session(model), feeds)
    for name, entry in runtime.agreement(want, got).items():
        assert got[name].shape == want[name].shape, name
        assert entry["max_rel_diff"] <= TOLERANCE, (name, entry)
    return model


def layer(kind: str, params: str = "", bottom: str = "data", top: str = "out", extra: str = "") -> str:
    return f'layer {{ name: "{top}" type: "{kind}" bottom: "{bottom}" top: "{top}" {params} }}\n{extra}'


SINGLE = [
    ("Convolution", "convolution_param { num_output: 4 kernel_size: 3 }"),
    ("Convolution", "convolution_param { num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 3 }"),
    ("Convolution", "convolution_param { num_output: 4 kernel_size: 3 dilation: 2 pad: 2 }"),
    (
        "Convolution",
        "convolution_param { num_output: 4 kernel_h: 3 kernel_w: 2 stride_h: 2 pad_h: 1 bias_term: false }",
    ),
    ("Deconvolution", "convolution_param { num_output: 4 kernel_size: 4 stride: 2 pad: 1 group: 2 }"),
    ("InnerProduct", "inner_product_param { num_output: 5 }"),
    ("InnerProduct", "inner_product_param { num_output: 5 transpose: true bias_term: false }"),
    ("ReLU", ""),
    ("ReLU", "relu_param { negative_slope: 0.1 }"),
    ("PReLU", ""),
    ("PReLU", "prelu_param { channel_shared: true }"),
    ("Sigmoid", ""),
    ("TanH", ""),
    ("AbsVal", ""),
    ("Dropout", "dropout_param { dropout_ratio: 0.3 }"),
    ("Power", "power_param { power: 2 scale: 0.5 shift: 3 }"),
    ("Power", "power_param { power: 0.5 scale: 0.1 shift: 2 }"),
    # A large alpha, so that a wrong alpha/size convention could not hide in the rounding.
    ("LRN", "lrn_param { local_size: 5 alpha: 2 beta: 0.75 k: 1.5 }"),
    ("LRN", "lrn_param { local_size: 3 alpha: 2 beta: 0.75 norm_region: WITHIN_CHANNEL }"),
    ("BatchNorm", "batch_norm_param { eps: 0.001 }"),
    ("Scale", "scale_param { bias_term: true }"),
    ("Bias", ""),
    ("Softmax", ""),  # over the channels at every position
    ("Flatten", ""),
    ("Flatten", "flatten_param { axis: 1 end_axis: 2 }"),
    ("Reshape", "reshape_param { shape { dim: 0 dim: -1 dim: 7 } }"),
]


@pytest.mark.parametrize(("kind", "params"), SINGLE, ids=[f"{k}-{i}" for i, (k, _) in enumerate(SINGLE)])
def test_each_layer_alone_matches_pycaffe(tmp_path: Path, kind: str, params: str) -> None:
    deploy = net_of(tmp_path, layer(kind, params))
    net, _ = random_net(deploy, seed=2)
    if kind == "BatchNorm":  # a stored scale factor other than 1, as Caffe's moving averages leave it
        net.params["out"][2].data[...] = 4.0
    compare(deploy, net)


def test_pooling_sizes_and_divisors_match_caffe(tmp_path: Path) -> None:
    """Every combination of size, kernel, stride and padding where Caffe's ceil rounding, its rule for a
    last window in the padding and its average divisor (padding counted up to H + pad) can matter."""
    load_caffe()
    checked = 0
    for size, kernel, stride, pad, pool in itertools.product(
        (5, 6, 7), (2, 3), (1, 2, 3), (0, 1, 2), ("MAX", "AVE")
    ):
        if pad >= kernel:
            continue
        params = f"pooling_param {{ pool: {pool} kernel_size: {kernel} stride: {stride} pad: {pad} }}"
        deploy = net_of(tmp_path, layer("Pooling", params), shape=(1, 2, size, size))
        net, _ = random_net(deploy, seed=0)
        out = onnx_export.pooled_size(size, kernel, stride, pad)
        assert net.blobs["out"].data.shape[2] == out
        if (out - 1) * stride - pad >= size:  # unpadded, stride > kernel: Caffe pools an empty window
            with pytest.raises(CaffeEvoError, match="a last window wholly outside the input"):
                compare(deploy, net)
            continue
        compare(deploy, net)
        checked += 1
    rect = "pooling_param { pool: AVE kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 1 }"
    for params in (
        rect,
        "pooling_param { pool: MAX global_pooling: true }",
        "pooling_param { pool: AVE global_pooling: true }",
    ):
        deploy = net_of(tmp_path, layer("Pooling", params), shape=(1, 2, 7, 8))
        compare(deploy, random_net(deploy, seed=0)[0])
    assert checked > 50
    # The rule that drops a last window starting in the end padding: 5 + 2*1 - 2 = 5, ceil(5/3) + 1 = 3,
    # but (3 - 1) * 3 >= 5 + 1, so Caffe makes 2 (and the loop above checked that case against Caffe).
    assert onnx_export.pooled_size(5, 2, 3, 1) == 2


COMBINED = """
layer { name: "slice" type: "Slice" bottom: "data" top: "s1" top: "s2" top: "s3"
  slice_param { axis: 1 slice_point: 2 slice_point: 4 } }
layer { name: "sum" type: "Eltwise" bottom: "s1" bottom: "s2" top: "sum"
  eltwise_param { operation: SUM coeff: 1 coeff: -0.5 } }
layer { name: "prod" type: "Eltwise" bottom: "s1" bottom: "s3" top: "prod" eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "s2" bottom: "s3" top: "max" eltwise_param { operation: MAX } }
layer { name: "cat" type: "Concat" bottom: "sum" bottom: "prod" bottom: "max" top: "cat" }
layer { name: "split" type: "Split" bottom: "cat" top: "a" top: "b" }
layer { name: "c" type: "Convolution" bottom: "a" top: "c"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "c_bn" type: "BatchNorm" bottom: "c" top: "c" }
layer { name: "c_scale" type: "Scale" bottom: "c" top: "c" scale_param { bias_term: true } }
layer { name: "c_relu" type: "ReLU" bottom: "c" top: "c" }
layer { name: "bias" type: "Bias" bottom: "b" top: "bb" }
layer { name: "p" type: "Pooling" bottom: "bb" top: "p"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
"""


def test_layers_in_combination_and_two_outputs(tmp_path: Path) -> None:
    deploy = net_of(tmp_path, COMBINED)
    net, _ = random_net(deploy, seed=4)
    assert sorted(net.outputs) == ["c", "p"]
    model = compare(deploy, net)
    ops = [node.op_type for node in model.graph.node]
    # BatchNorm + Scale became one BatchNormalization node: no Mul of the Scale's, only those of PROD, the
    # -0.5 coefficient, and the padded average pooling's divisor map.
    assert ops.count("BatchNormalization") == 1
    assert ops.count("Mul") == 3
    assert [o.name for o in model.graph.output] == ["c", "p"]


@pytest.mark.parametrize("fixture", ["alexnet_small", "resnet_small", "concat_small"])
def test_fixture_nets_with_random_weights(fixture: str, tmp_path: Path) -> None:
    deploy = FIXTURES / f"{fixture}.prototxt"
    net, _ = random_net(deploy, seed=5)
    # Compare the logits too: the final Softmax could hide a small error.
    proto = parse_prototxt(deploy, caffe_pb2().NetParameter())
    del proto.layer[-1]
    logits = tmp_path / f"{fixture}_logits.prototxt"
    logits.write_text(str(proto))
    logit_net = load_caffe().Net(str(logits), load_caffe().TEST)
    for name in logit_net.params:
        for mine, theirs in zip(logit_net.params[name], net.params[name], strict=True):
            mine.data[...] = theirs.data
    compare(logits, logit_net, batch=2)
    compare(deploy, net, batch=2)
    for opset in (11, 17):
        compare(deploy, net, onnx_export.ExportOptions(opset=opset), batch=1)


def test_fp16_model_types_and_values(tmp_path: Path) -> None:
    deploy = FIXTURES / "resnet_small.prototxt"
    net, _ = random_net(deploy, seed=6)
    proto = parse_prototxt(deploy, caffe_pb2().NetParameter())
    feeds = {"data": np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)}
    want = runtime.caffe_forward(net, feeds)
    for io, tensor_type in (("fp32", "tensor(float)"), ("fp16", "tensor(float16)")):
        model = onnx_export.convert(proto, net, onnx_export.ExportOptions(precision="fp16", io_precision=io))
        weights = [init for init in model.graph.initializer if init.data_type != 7]  # 7: int64 shapes
        assert weights and all(init.data_type == 10 for init in weights)  # 10: float16
        session = runtime.ort_session(model)
        assert session.get_inputs()[0].type == tensor_type == session.get_outputs()[0].type
        entry = runtime.agreement(want, runtime.ort_forward(session, feeds))["prob"]
        assert 0 < entry["max_rel_diff"] < 2e-2, entry
    with pytest.raises(CaffeEvoError, match="fp16 inputs and outputs need an fp16 model"):
        onnx_export.convert(proto, net, onnx_export.ExportOptions(io_precision="fp16"))


@pytest.mark.parametrize(
    ("layers", "options", "message"),
    [
        (layer("ArgMax", ""), {}, "layer 'out' has type ArgMax, which the ONNX export does not support"),
        (layer("Softmax", ""), {"opset": 12}, r"layer 'out' \(Softmax\).*needs opset 13"),
        (layer("Reshape", "reshape_param { shape { dim: -1 dim: 2 } }"), {}, "reshaping the batch axis"),
        (layer("Pooling", "pooling_param { pool: STOCHASTIC kernel_size: 2 }"), {}, "STOCHASTIC"),
        (layer("ReLU", ""), {"opset": 7}, "--opset 7: choose from 11"),
    ],
)
def test_what_onnx_cannot_express_is_one_error(
    tmp_path: Path, layers: str, options: dict, message: str
) -> None:
    deploy = net_of(tmp_path, layers)
    net, _ = random_net(deploy, seed=0)
    with pytest.raises(CaffeEvoError, match=message):
        onnx_export.convert(
            parse_prototxt(deploy, caffe_pb2().NetParameter()), net, onnx_export.ExportOptions(**options)
        )


def test_fp16_overflow_is_one_error(tmp_path: Path) -> None:
    deploy = net_of(tmp_path, layer("Convolution", "convolution_param { num_output: 2 kernel_size: 1 }"))
    net, _ = random_net(deploy, seed=0)
    net.params["out"][0].data[0, 0] = 1e6
    proto = parse_prototxt(deploy, caffe_pb2().NetParameter())
    compare(deploy, net)  # fine in fp32
    with pytest.raises(CaffeEvoError, match="fp16 export overflows layer 'out': 1 values beyond"):
        onnx_export.convert(proto, net, onnx_export.ExportOptions(precision="fp16"))


# -- LeNet-5 on MNIST: an ancestor and an evolved compact network, through `caffe-evo export` ---------------


@pytest.fixture(scope="module")
def lineage(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """An fp16-restricted LeNet-5 lineage of one generation (short training, small evaluations)."""
    recipe = short_eval_recipe(tmp_path_factory.mktemp("recipes") / "lenet5")
    run = tmp_path_factory.mktemp("evo") / "run"
    config = {
        "recipe": str(recipe),
        "data_root": str(data_root),
        "generations": 1,
        "seed": 1,
        "ancestor_iters": 300,
        "iters_per_generation": 100,
        "population": 1,
        "max_accuracy_drop": 1.0,
        "precision": "fp16",
        "cluster_factor": 0.6,
    }
    start(EvolutionConfig.from_json(config), run, progress=False).run()
    return run


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "caffe_evo.cli", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, OPENBLAS_NUM_THREADS="1"),
    )


def test_evolved_compact_net_is_rounded_to_the_runs_precision(lineage: Path) -> None:
    gen = lineage / "gen_001"
    metrics = json.loads((gen / "metrics.json").read_text())
    assert metrics["cost"]["compaction"]["rounding"]["precision"] == "fp16"
    net = load_net(gen / "compact" / "deploy.prototxt", gen / "compact" / "weights.caffemodel")
    stored = np.load(gen / "compact" / "weights_fp16.npz")
    for name, blobs in net.params.items():
        for i, blob in enumerate(blobs):
            np.testing.assert_array_equal(blob.data.astype(np.float16).astype(np.float32), blob.data)
            np.testing.assert_array_equal(stored[f"{name}/{i}"], blob.data.astype(np.float16))
    assert metrics["cost"]["compact"]["macs"] < metrics["cost"]["full"]["macs"]
    for key in ("ort_1t_fps_batch1", "ort_all_images_per_s_batch64", "fps_batch1"):
        assert metrics["cost"]["compact"][key] > 0


@pytest.mark.parametrize("generation", ["gen_000", "gen_001"])
def test_export_agrees_with_pycaffe_on_mnist_test_images(lineage: Path, generation: str) -> None:
    gen = lineage / generation
    result = _cli("export", str(gen), "--precision", "fp16")
    assert result.returncode == 0, result.stderr
    assert "checked on 500 test images" in result.stdout
    assert sorted(p.name for p in (gen / "deploy").iterdir()) == ["model.onnx", "model_fp16.onnx"]
    deploy = json.loads((gen / "metrics.json").read_text())["deploy"]
    fp32 = deploy["onnx"]["agreement"]["prob"]
    assert fp32["samples"] == 500 and fp32["top1_agreement"] == 1.0 and fp32["max_rel_diff"] < 1e-4
    assert deploy["onnx_fp16"]["agreement"]["prob"]["top1_agreement"] >= 0.99
    # The published file is the checked one: reload it and classify real test images.
    net = load_net(gen / "compact" / "deploy.prototxt", gen / "compact" / "weights.caffemodel")
    feeds, labels, _ = check_inputs(gen, net, count=200)
    session = runtime.ort_session((gen / "deploy" / "model.onnx").read_bytes())
    accuracy = float(np.mean(np.argmax(runtime.ort_forward(session, feeds)["prob"], axis=1) == labels))
    assert accuracy > 0.8


def test_export_bad_input_is_one_line_and_writes_nothing(lineage: Path, tmp_path: Path) -> None:
    gen = tmp_path / "gen_001"
    shutil.copytree(lineage / "gen_001", gen)
    shutil.rmtree(gen / "deploy", ignore_errors=True)
    cases = [
        (["--format", "trt", "--precision", "fp16"], "needs TensorRT's Python package"),
        (["--format", "trt"], "--format trt builds fp16 engines"),
        (["--precision", "int8"], "precision 'int8'"),
        (["--opset", "3"], "--opset 3"),
    ]
    for args, message in cases:
        result = _cli("export", str(gen), *args)
        assert (
            result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
        ), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (gen / "deploy").exists() and no_partials(gen)
    (gen / "compact" / "weights.caffemodel").write_bytes(b"not a caffemodel")
    result = _cli("export", str(gen))
    assert result.returncode == 2 and "not a valid caffemodel" in result.stderr, result.stderr
    shutil.rmtree(gen / "compact")
    result = _cli("export", str(gen))
    assert (
        result.returncode == 2
        and "no compact network" in result.stderr
        and "caffe-evo compact" in result.stderr
    )
    assert not (gen / "deploy").exists() and no_partials(gen)


def test_bench_engine_times_an_onnx_model_and_explains_trt(lineage: Path) -> None:
    gen = lineage / "gen_000"
    if not (gen / "deploy" / "model.onnx").exists():
        export_generation(gen)
    result = _cli("bench-engine", str(gen / "deploy" / "model.onnx"), "--batch", "4", "--repeats", "5")
    assert result.returncode == 0 and "(onnxruntime): batch 4 median" in result.stdout, result.stderr
    engine = gen / "deploy" / "fake.engine"
    engine.write_bytes(b"x")
    try:
        result = _cli("bench-engine", str(engine))
        assert result.returncode == 2 and "needs TensorRT's Python package" in result.stderr
    finally:
        engine.unlink()


def test_cost_times_onnx_runtime_and_survives_a_net_onnx_cannot_express(tmp_path: Path) -> None:
    from caffe_evo.deploy.measure import network_cost

    for params, exportable in (
        ("pool: MAX kernel_size: 2 stride: 2", True),
        ("pool: MAX kernel_size: 2 stride: 3", False),
    ):
        layers = layer("Convolution", "convolution_param { num_output: 2 kernel_size: 3 }", top="c")
        layers += layer("Pooling", f"pooling_param {{ {params} }}", bottom="c", top="p")
        deploy = net_of(tmp_path, layers, shape=(1, 1, 8, 8))  # c is 6x6: stride 3 pools an empty window
        net, _ = random_net(deploy, seed=0)
        net.save(str(tmp_path / "w.caffemodel"))
        cost = network_cost(deploy, tmp_path / "w.caffemodel", repeats=3)
        assert cost["fps_batch1"] > 0
        if exportable:
            assert cost["ort_1t_fps_batch1"] > 0 and cost["ort_all_images_per_s_batch64"] > 0
            assert cost["ort_threads_all"] == runtime.all_cores()
        else:
            assert "a last window wholly outside the input" in cost["ort_unavailable"]


def test_a_missing_runtime_package_is_one_line() -> None:
    with pytest.raises(CaffeEvoError, match="the no_such_runtime package is missing; `bash scripts/setup"):
        runtime.require("no_such_runtime")


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_compaction_rounds_folded_biases_to_the_runs_precision(tmp_path: Path, fmt: str) -> None:
    """A restricted run's net holds representable values; the constant that compaction folds into ip2's
    bias is a new float32 sum, which is rounded too, and the self-check still holds."""
    from test_compaction import LENET, dead_kernels, random_masks, save_masked

    from caffe_evo.deploy.compaction import compact
    from caffe_evo.precision import FORMATS, restrict_net

    net, rng = random_net(LENET, 1)
    masks = random_masks(net, rng, {"conv1": 10, "conv2": 25, "ip1": 250})
    folded = dead_kernels(masks, "ip1")[0]
    weights = save_masked(net, masks, {"ip1": {folded: 0.7}}, tmp_path / "full")
    restrict_net(net, fmt)
    net.save(str(weights))
    summary = compact(LENET, weights, tmp_path / "compact", precision=fmt)  # the zeros are the masks
    assert summary["layers"]["ip2"]["folded"] == 1 and summary["rounding"]["changed"] >= 1
    assert summary["max_abs_diff"] > 0  # the rounded bias differs a little from the float32 sum
    small = load_net(tmp_path / "compact" / "deploy.prototxt", tmp_path / "compact" / "weights.caffemodel")
    stored = np.load(tmp_path / "compact" / f"weights_{fmt}.npz")
    assert sorted(stored.files) == sorted(f"{name}/{i}" for name in small.params for i in range(2))
    for blobs in small.params.values():
        for blob in blobs:
            np.testing.assert_array_equal(FORMATS[fmt](blob.data), blob.data)
    if fmt == "fp16":
        np.testing.assert_array_equal(stored["ip2/1"], small.params["ip2"][1].data.astype(np.float16))
