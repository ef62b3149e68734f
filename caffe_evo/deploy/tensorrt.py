"""TensorRT fp16 engines of a compact network, and their timing.

NOT RUN on any machine of this project: none has TensorRT or an NVIDIA GPU. Every decision that does not
need TensorRT (which parser for which version, network flags, how fp16 is asked for, the workspace and
execution APIs, I/O shapes, which CUDA binding) is a plain function here and tested; the functions that
call ``tensorrt`` (:func:`build_engine`, :func:`time_engine`) are a thin layer over those decisions,
tested only where ``tensorrt`` imports and a GPU is present.

Routes (the precision paper deployed its fp16 networks through TensorRT's Caffe parser):

- TensorRT <= 8.6 (JetPack 4.x, 5.x, 6.0): ``trt.CaffeParser`` on the compact ``deploy.prototxt`` and
  ``weights.caffemodel``, an implicit-batch network, fp16 weights and the FP16 builder flag.
- TensorRT >= 9 (the Caffe parser is gone): the ONNX parser on our ONNX model, an explicit-batch network
  with an optimisation profile for the symbolic batch axis; fp16 through the FP16 builder flag where it
  exists, else (TensorRT 11 dropped it) a strongly typed network parsed from the fp16 ONNX model.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caffe_evo.errors import CaffeEvoError

INSTALL_HINT = (
    "TensorRT comes with JetPack on a Jetson, or from NVIDIA for a CUDA machine "
    "(`pip install tensorrt --extra-index-url https://pypi.nvidia.com`); the runner also needs "
    "`pip install cuda-python` (or pycuda)"
)
WORKSPACE_BYTES = 1 << 30


def parse_version(text: str) -> tuple[int, int]:
    """``"8.6.1.6"`` -> ``(8, 6)``."""
    parts = text.split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise CaffeEvoError(f"cannot read the TensorRT version {text!r}") from None


@dataclass(frozen=True)
class Route:
    """How one TensorRT version builds an engine of a compact Caffe network."""

    parser: str  # "caffe" (deploy.prototxt + caffemodel) | "onnx"
    fp16: str  # "builder_flag" | "strongly_typed" | "none" (an fp32 engine)
    network_flags: tuple[str, ...]  # NetworkDefinitionCreationFlag names
    onnx_model: str | None  # which of our ONNX files the ONNX parser reads
    workspace_api: str  # "set_memory_pool_limit" (>= 8.4) | "max_workspace_size"
    execution: str  # "execute_async" (implicit batch) | "execute_async_v2" | "execute_async_v3"

    @property
    def implicit_batch(self) -> bool:
        return self.parser == "caffe"


def choose_route(version: str, precision: str, has_fp16_flag: bool | None = None) -> Route:
    """The route for TensorRT ``version`` and ``precision`` ("fp16" or "fp32").

    ``has_fp16_flag`` is whether ``trt.BuilderFlag.FP16`` exists in the installed TensorRT (None: decided
    by version alone; it disappeared in TensorRT 11).
    """
    if precision not in ("fp16", "fp32"):
        raise CaffeEvoError(f"TensorRT engine precision {precision!r}: choose fp16 or fp32")
    major, minor = parse_version(version)
    if major < 8:
        raise CaffeEvoError(f"TensorRT {version} is older than 8.0, which caffe-evo needs")
    if has_fp16_flag is None:
        has_fp16_flag = major < 11
    workspace = "set_memory_pool_limit" if (major, minor) >= (8, 4) else "max_workspace_size"
    if (major, minor) <= (8, 6):
        return Route(
            parser="caffe",
            fp16="builder_flag" if precision == "fp16" else "none",
            network_flags=(),
            onnx_model=None,
            workspace_api=workspace,
            execution="execute_async",
        )
    fp16 = "none" if precision == "fp32" else ("builder_flag" if has_fp16_flag else "strongly_typed")
    flags = ("EXPLICIT_BATCH",) if major < 10 else ()  # explicit batch is the only kind from TensorRT 10
    if fp16 == "strongly_typed":
        flags = (*flags, "STRONGLY_TYPED")
    return Route(
        parser="onnx",
        fp16=fp16,
        network_flags=flags,
        onnx_model="model_fp16.onnx" if fp16 == "strongly_typed" else "model.onnx",
        workspace_api=workspace,
        execution="execute_async_v3",
    )


def profile_shapes(input_shape: tuple[int, ...], batch: int) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) shapes of an input with a symbolic batch axis, for engines up to ``batch`` images."""
    if batch < 1:
        raise CaffeEvoError(f"engine batch must be >= 1, got {batch}")
    rest = tuple(input_shape[1:])
    return (1, *rest), (batch, *rest), (batch, *rest)


def choose_cuda_binding(importable: dict[str, bool]) -> str:
    """``cuda-python`` (``cuda.bindings``, what TensorRT's samples use) where importable, else ``pycuda``."""
    for name in ("cuda-python", "pycuda"):
        if importable.get(name):
            return name
    raise CaffeEvoError(
        f"the TensorRT runner needs cuda-python or pycuda, and neither imports; {INSTALL_HINT}"
    )


def _importable() -> dict[str, bool]:
    def found(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # the parent package is missing
            return False

    return {"cuda-python": found("cuda.bindings"), "pycuda": found("pycuda")}


def require() -> Any:
    """The ``tensorrt`` module, or one line saying what is missing and how to get it."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:
        raise CaffeEvoError(f"--format trt needs TensorRT's Python package ({exc}); {INSTALL_HINT}") from None
    choose_cuda_binding(_importable())
    return trt


# -- the thin layer that calls TensorRT (not run here: no TensorRT, no GPU) ---------------------------------


def build_engine(
    trt: Any,
    route: Route,
    compact_dir: Path,
    deploy_dir: Path,
    outputs: list[str],
    input_shape: tuple[int, ...],
    batch: int,
) -> bytes:
    """A serialized engine along ``route``: from the Caffe files in ``compact_dir`` or an ONNX model in
    ``deploy_dir``."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    for name in route.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    config = builder.create_builder_config()
    if route.workspace_api == "set_memory_pool_limit":
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    else:
        config.max_workspace_size = WORKSPACE_BYTES
    if route.fp16 == "builder_flag":
        config.set_flag(trt.BuilderFlag.FP16)
    if route.parser == "caffe":
        parser = trt.CaffeParser()
        dtype = trt.float16 if route.fp16 != "none" else trt.float32
        tensors = parser.parse(
            deploy=str(compact_dir / "deploy.prototxt"),
            model=str(compact_dir / "weights.caffemodel"),
            network=network,
            dtype=dtype,
        )
        for name in outputs:
            network.mark_output(tensors.find(name))
        builder.max_batch_size = batch
    else:
        parser = trt.OnnxParser(network, logger)
        if not parser.parse((deploy_dir / route.onnx_model).read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise CaffeEvoError(f"TensorRT's ONNX parser refused {route.onnx_model}: {errors}")
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            profile.set_shape(network.get_input(i).name, *profile_shapes(input_shape, batch))
        config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise CaffeEvoError("TensorRT could not build the engine (see its log above)")
    return bytes(engine)


class _CudaPython:
    """Device buffers and a stream through cuda-python (``cuda.bindings.runtime``)."""

    def __init__(self) -> None:
        from cuda.bindings import runtime

        self.rt = runtime
        self.buffers: list[Any] = []
        self.stream = self._check(runtime.cudaStreamCreate())

    def _check(self, result: Any) -> Any:
        err, *values = result
        if int(err) != 0:
            raise CaffeEvoError(f"CUDA error {err}")
        return values[0] if values else None

    def upload(self, host: Any) -> int:
        device = self._check(self.rt.cudaMalloc(host.nbytes))
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpy(device, host.ctypes.data, host.nbytes, kind))
        self.buffers.append(device)
        return int(device)

    def synchronize(self) -> None:
        self._check(self.rt.cudaStreamSynchronize(self.stream))

    def close(self) -> None:
        for device in self.buffers:
            self._check(self.rt.cudaFree(device))
        self._check(self.rt.cudaStreamDestroy(self.stream))


class _PyCuda:
    """The same through pycuda (often what a Jetson has)."""

    def __init__(self) -> None:
        import pycuda.autoinit  # noqa: F401 (creates the context)
        import pycuda.driver as driver

        self.driver = driver
        self.buffers: list[Any] = []
        self._stream = driver.Stream()
        self.stream = self._stream.handle

    def upload(self, host: Any) -> int:
        device = self.driver.mem_alloc(host.nbytes)
        self.driver.memcpy_htod(device, host)
        self.buffers.append(device)
        return int(device)

    def synchronize(self) -> None:
        self._stream.synchronize()

    def close(self) -> None:
        for device in self.buffers:
            device.free()


def time_engine(trt: Any, engine_path: Path, batch: int, repeats: int) -> dict:
    """Median batch latency of an engine of the ONNX route (explicit batch), on a random input.

    An implicit-batch engine of the Caffe parser (TensorRT <= 8.6) is timed with NVIDIA's ``trtexec
    --loadEngine=...`` instead.
    """
    import numpy as np

    from caffe_evo.deploy.runtime import median_ms, timing

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise CaffeEvoError(f"{engine_path}: TensorRT cannot deserialize it (built by another version?)")
    if getattr(engine, "has_implicit_batch_dimension", False) or not hasattr(engine, "num_io_tensors"):
        raise CaffeEvoError(f"{engine_path}: an implicit-batch engine; time it with trtexec --loadEngine")
    cuda = _CudaPython() if choose_cuda_binding(_importable()) == "cuda-python" else _PyCuda()
    try:
        context = engine.create_execution_context()
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                context.set_input_shape(name, (batch, *tuple(engine.get_tensor_shape(name))[1:]))
            shape = tuple(context.get_tensor_shape(name))
            host = (
                np.random.default_rng(0)
                .standard_normal(shape)
                .astype(trt.nptype(engine.get_tensor_dtype(name)))
            )
            context.set_tensor_address(name, cuda.upload(host))

        def forward() -> None:
            context.execute_async_v3(cuda.stream)
            cuda.synchronize()

        return timing(batch, median_ms(forward, repeats, warmup=5), repeats)
    finally:
        cuda.close()
