"""TensorRT: the decisions, tested everywhere; the engine itself only where TensorRT and a GPU exist."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import RECIPES
from test_compaction import random_net

from caffe_evo.caffe_env import caffe_pb2
from caffe_evo.deploy import onnx_export, tensorrt
from caffe_evo.errors import CaffeEvoError
from caffe_evo.recipe import parse_prototxt


@pytest.mark.parametrize(
    ("version", "parser", "fp16", "flags", "model", "workspace", "execution"),
    [
        # JetPack 4.6 (TensorRT 8.2): the Caffe parser, implicit batch, the old workspace field.
        ("8.2.1.8", "caffe", "builder_flag", (), None, "max_workspace_size", "execute_async"),
        ("8.6.1.6", "caffe", "builder_flag", (), None, "set_memory_pool_limit", "execute_async"),
        (
            "9.3.0",
            "onnx",
            "builder_flag",
            ("EXPLICIT_BATCH",),
            "model.onnx",
            "set_memory_pool_limit",
            "execute_async_v3",
        ),
        ("10.3.0", "onnx", "builder_flag", (), "model.onnx", "set_memory_pool_limit", "execute_async_v3"),
        # TensorRT 11 has no FP16 flag: a strongly typed network of the fp16 model.
        (
            "11.0.0",
            "onnx",
            "strongly_typed",
            ("STRONGLY_TYPED",),
            "model_fp16.onnx",
            "set_memory_pool_limit",
            "execute_async_v3",
        ),
    ],
)
def test_route_by_version(version, parser, fp16, flags, model, workspace, execution) -> None:
    route = tensorrt.choose_route(version, "fp16")
    assert (route.parser, route.fp16, route.network_flags) == (parser, fp16, flags)
    assert (route.onnx_model, route.workspace_api, route.execution) == (model, workspace, execution)
    assert route.implicit_batch == (parser == "caffe")


def test_route_follows_the_installed_flag_and_precision() -> None:
    # A TensorRT 10 build without the FP16 flag takes the strongly typed route too.
    assert tensorrt.choose_route("10.14.1", "fp16", has_fp16_flag=False).fp16 == "strongly_typed"
    assert tensorrt.choose_route("11.1", "fp16", has_fp16_flag=True).fp16 == "builder_flag"
    fp32 = tensorrt.choose_route("11.0", "fp32")
    assert (fp32.fp16, fp32.network_flags, fp32.onnx_model) == ("none", (), "model.onnx")
    assert tensorrt.choose_route("8.6", "fp32").fp16 == "none"


@pytest.mark.parametrize(
    ("version", "precision", "message"),
    [
        ("7.1.3", "fp16", "older than 8.0"),
        ("ten", "fp16", "cannot read the TensorRT version"),
        ("10.0", "int8", "choose fp16 or fp32"),
    ],
)
def test_route_errors(version: str, precision: str, message: str) -> None:
    with pytest.raises(CaffeEvoError, match=message):
        tensorrt.choose_route(version, precision)


def test_profile_shapes_and_cuda_binding() -> None:
    assert tensorrt.profile_shapes((1, 1, 28, 28), 64) == ((1, 1, 28, 28), (64, 1, 28, 28), (64, 1, 28, 28))
    with pytest.raises(CaffeEvoError, match="batch must be >= 1"):
        tensorrt.profile_shapes((1, 3, 8, 8), 0)
    assert tensorrt.choose_cuda_binding({"cuda-python": True, "pycuda": True}) == "cuda-python"
    assert tensorrt.choose_cuda_binding({"cuda-python": False, "pycuda": True}) == "pycuda"
    with pytest.raises(CaffeEvoError, match="needs cuda-python or pycuda.*pip install cuda-python"):
        tensorrt.choose_cuda_binding({"cuda-python": False, "pycuda": False})


def test_missing_tensorrt_is_one_line_with_the_way_to_get_it() -> None:
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is importable here")
    with pytest.raises(CaffeEvoError, match=r"needs TensorRT's Python package .*JetPack.*pypi.nvidia.com"):
        tensorrt.require()


def _gpu_present() -> bool:
    try:
        from cuda.bindings import runtime
    except ImportError:
        return False
    err, count = runtime.cudaGetDeviceCount()
    return int(err) == 0 and count > 0


def test_fp16_engine_builds_and_runs_on_a_gpu(tmp_path: Path) -> None:
    trt = pytest.importorskip(
        "tensorrt", reason="TensorRT is not installed (no machine of this project has it)"
    )
    if not _gpu_present():
        pytest.skip("no NVIDIA GPU visible through cuda-python")
    deploy = RECIPES / "lenet5" / "deploy.prototxt"
    net, _ = random_net(deploy, seed=0)
    proto = parse_prototxt(deploy, caffe_pb2().NetParameter())
    for name, options in (("model.onnx", {}), ("model_fp16.onnx", {"precision": "fp16"})):
        model = onnx_export.convert(proto, net, onnx_export.ExportOptions(**options))
        (tmp_path / name).write_bytes(model.SerializeToString())
    route = tensorrt.choose_route(trt.__version__, "fp16", hasattr(trt.BuilderFlag, "FP16"))
    if route.parser == "caffe":
        pytest.skip("the Caffe-parser route needs the compact net's Caffe files and trtexec to time it")
    engine = tensorrt.build_engine(trt, route, tmp_path, tmp_path, list(net.outputs), (1, 1, 28, 28), 64)
    (tmp_path / "model_fp16.engine").write_bytes(engine)
    timing = tensorrt.time_engine(trt, tmp_path / "model_fp16.engine", batch=64, repeats=10)
    assert timing["images_per_s"] > 0
