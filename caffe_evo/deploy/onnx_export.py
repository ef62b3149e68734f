"""Caffe -> ONNX: our own converter over ``caffe_pb2`` (no maintained Caffe-to-ONNX package runs on 3.11).

Each Caffe layer becomes the ONNX nodes that compute exactly what Caffe computes:

- Pooling: Caffe rounds the output size up and then drops a last window that would start inside the end
  padding; ONNX gets explicit end pads that give that size with floor rounding. Average pooling divides
  by a window that counts the padding up to ``H + pad`` (Caffe's rule); ONNX divides by the real
  elements (``count_include_pad=0``, the one reading every runtime agrees on) and a constant map
  rescales where the two differ.
- InnerProduct flattens everything after the batch axis (Flatten + Gemm).
- LRN ACROSS_CHANNELS: Caffe's ``k + alpha / n * sum`` is ONNX's ``bias + alpha / size * sum``, the same
  convention; WITHIN_CHANNEL is Caffe's own composition (square, average pool, ``(1 + alpha x)^-beta``).
- BatchNorm: the stored statistics are divided by the stored scale factor; a Scale that alone reads a
  BatchNorm's output is folded into that one BatchNormalization node.
- Eltwise SUM multiplies by its coefficients, in Caffe's order.

The batch axis is symbolic (``batch``), so one model serves batch 1 and batch 64; a layer that would
change the batch axis (Reshape or Slice over axis 0) is refused. An fp16 model holds fp16 weights and
computes in fp16, with fp32 or fp16 inputs and outputs. The model passes ``onnx.checker`` with full
shape inference, and its output shapes must be Caffe's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from caffe_evo.deploy.runtime import require
from caffe_evo.errors import CaffeEvoError

DEFAULT_OPSET = 13  # parsed by TensorRT 8.x (JetPack 4.6) as well as by TensorRT 10/11
MIN_OPSET = 11
PRECISIONS = ("fp32", "fp16")
BATCH = "batch"
_FP16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class ExportOptions:
    opset: int = DEFAULT_OPSET
    precision: str = "fp32"  # weights and compute
    io_precision: str = "fp32"  # inputs and outputs (fp16 only for an fp16 model)

    def check(self) -> None:
        onnx = require("onnx")
        newest = onnx.defs.onnx_opset_version()
        if not MIN_OPSET <= self.opset <= newest:
            raise CaffeEvoError(f"--opset {self.opset}: choose from {MIN_OPSET} to {newest}")
        for name, value in (("precision", self.precision), ("I/O precision", self.io_precision)):
            if value not in PRECISIONS:
                raise CaffeEvoError(f"ONNX export {name} {value!r}: choose from {', '.join(PRECISIONS)}")
        if self.precision == "fp32" and self.io_precision == "fp16":
            raise CaffeEvoError("fp16 inputs and outputs need an fp16 model (--precision fp16)")


def _unsupported(layer: Any, why: str) -> CaffeEvoError:
    return CaffeEvoError(f"layer '{layer.name}' ({layer.type}): {why}; the ONNX export does not support it")


def _pair(param: Any, field: str, prefix: str, default: int) -> tuple[int, int]:
    """Caffe's 2-D spatial parameter: explicit ``<prefix>_h``/``_w``, else one value (Pooling) or one or
    two repeated values (Convolution) of ``field``."""
    if param.HasField(f"{prefix}_h") or param.HasField(f"{prefix}_w"):
        return getattr(param, f"{prefix}_h"), getattr(param, f"{prefix}_w")
    values = getattr(param, field)
    if isinstance(values, int):
        return (values, values) if param.HasField(field) else (default, default)
    values = list(values) or [default]
    return (values[0], values[-1])


def pooled_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Caffe's pooled output size: rounded up, then without a last window that starts in the end padding."""
    out = -(-(size + 2 * pad - kernel) // stride) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def average_divisor_map(
    size: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pad: tuple[int, int],
    out: tuple[int, int],
) -> np.ndarray:
    """Per output position: Caffe's divisor (window clipped to ``size + pad``) over the real elements'."""
    factors = []
    for n, k, s, p, o in zip(size, kernel, stride, pad, out, strict=True):
        start = np.arange(o) * s - p
        caffe = np.minimum(start + k, n + p) - start
        real = np.minimum(start + k, n) - np.maximum(start, 0)
        factors.append(real / caffe)
    return np.outer(factors[0], factors[1])


class _Converter:
    def __init__(self, proto: Any, net: Any, options: ExportOptions) -> None:
        self.onnx = require("onnx")
        self.proto, self.net, self.options = proto, net, options
        self.dtype = np.float16 if options.precision == "fp16" else np.float32
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []
        self.producer: dict[str, Any] = {}  # tensor -> the node that writes it
        self.bn_of: dict[str, tuple[str, str]] = {}  # BatchNormalization output -> its scale and bias
        self._counter = 0
        self._plan()

    # -- naming: every blob version is one tensor; the last version of a net output keeps the blob's name --

    def _plan(self) -> None:
        built = set(self.net._layer_names)
        self.layers = [layer for layer in self.proto.layer if layer.name in built]
        writes: dict[str, int] = {}
        for name in self.proto.input:
            writes[name] = 1
        for layer in self.layers:
            for top in layer.top:
                writes[top] = writes.get(top, 0) + 1
        self.cast_io = self.options.precision == "fp16" and self.options.io_precision == "fp32"
        self.net_outputs = list(self.net.outputs)
        seen: dict[str, int] = {}
        current: dict[str, str] = {}
        self.reads: dict[str, int] = {}
        self.io: list[tuple[list[str], list[str]]] = []

        inputs = {
            *self.proto.input,
            *(top for layer in self.layers if layer.type == "Input" for top in layer.top),
        }

        def version(blob: str) -> str:
            """Graph inputs and outputs carry the blob's name; a Cast to or from fp16 stands between."""
            k = seen.get(blob, 0)
            seen[blob] = k + 1
            if blob in inputs:
                bare = k == 0 and not self.cast_io
            else:
                bare = k == writes[blob] - 1 and not (self.cast_io and blob in self.net_outputs)
            name = blob if bare else f"{blob}__v{k}"
            current[blob] = name
            return name

        self.input_tensors = {name: version(name) for name in self.proto.input}
        for layer in self.layers:
            bottoms = [current[b] for b in layer.bottom]
            for b in bottoms:
                self.reads[b] = self.reads.get(b, 0) + 1
            self.io.append((bottoms, [version(t) for t in layer.top]))
        self.final = {name: current[name] for name in self.net_outputs}

    def _name(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}__{self._counter}"

    def cast(self, layer: Any, values: Any) -> np.ndarray:
        """``values`` in the model's precision; an fp16 overflow is an error, not an infinity."""
        values = np.asarray(values, dtype=np.float64)
        if self.dtype == np.float16 and np.any(np.abs(values) > _FP16_MAX):
            count = int(np.count_nonzero(np.abs(values) > _FP16_MAX))
            raise CaffeEvoError(
                f"fp16 export overflows layer '{layer.name}': {count} values beyond +-{_FP16_MAX:g} "
                f"(largest |v| {np.abs(values).max():.6g})"
            )
        return values.astype(self.dtype)

    def const(self, hint: str, values: Any, layer: Any) -> str:
        """An initializer in the model's precision."""
        name = self._name(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(self.cast(layer, values), name))
        return name

    def ints(self, hint: str, values: Sequence[int]) -> str:
        name = self._name(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def node(self, op: str, inputs: list[str], output: str | None, layer: Any, **attrs: Any) -> str:
        output = output or self._name(f"{layer.name}_{op}")
        node = self.onnx.helper.make_node(op, inputs, [output], name=self._name(layer.name), **attrs)
        self.nodes.append(node)
        self.producer[output] = node
        return output

    def chain(self, steps: list[tuple[str, str]], first: str, out: str, layer: Any) -> None:
        """Nodes ``(op, constant)`` applied one after another to ``first``, the last writing ``out``."""
        if not steps:
            self.node("Identity", [first], out, layer)
            return
        value = first
        for i, (op, constant) in enumerate(steps):
            value = self.node(op, [value, constant], out if i == len(steps) - 1 else None, layer)

    def shape(self, blob: str) -> tuple[int, ...]:
        return tuple(self.net.blobs[blob].data.shape)

    def params(self, layer: Any) -> list[np.ndarray]:
        if layer.name not in self.net.params:
            return []
        return [blob.data.astype(np.float64) for blob in self.net.params[layer.name]]

    # -- the graph --

    def convert(self) -> Any:
        helper, proto = self.onnx.helper, self.onnx.TensorProto
        io_type = proto.FLOAT16 if self.options.io_precision == "fp16" else proto.FLOAT
        inputs = dict(self.input_tensors)
        for layer, (bottoms, tops) in zip(self.layers, self.io, strict=True):
            if layer.type == "Input":
                inputs.update(zip(layer.top, tops, strict=True))
                continue
            convert = getattr(self, f"_{layer.type.lower()}", None)
            if convert is None:
                raise CaffeEvoError(
                    f"layer '{layer.name}' has type {layer.type}, which the ONNX export does not support"
                )
            convert(layer, bottoms, tops)
        for blob, tensor in inputs.items():
            dims = [BATCH, *self.shape(blob)[1:]]
            self.inputs.append(helper.make_tensor_value_info(blob, io_type, dims))
            if tensor != blob:
                self.nodes.insert(0, self._io_node(tensor, blob, proto.FLOAT16, reverse=True))
        for blob, tensor in self.final.items():
            if tensor != blob:
                self.nodes.append(self._io_node(tensor, blob, proto.FLOAT))
            self.outputs.append(helper.make_tensor_value_info(blob, io_type, [BATCH, *self.shape(blob)[1:]]))
        graph = helper.make_graph(
            self.nodes, self.proto.name or "caffe_net", self.inputs, self.outputs, self.initializers
        )
        opsets = [helper.make_opsetid("", self.options.opset)]
        model = helper.make_model(
            graph,
            opset_imports=opsets,
            producer_name="caffe-evo",
            ir_version=helper.find_min_ir_version_for(opsets),
        )
        self._check(model)
        return model

    def _io_node(self, tensor: str, blob: str, to: int, reverse: bool = False) -> Any:
        """Between a graph input/output named ``blob`` and the tensor inside: a Cast, or an Identity."""
        source, target = (blob, tensor) if reverse else (tensor, blob)
        if self.cast_io:
            return self.onnx.helper.make_node("Cast", [source], [target], to=to)
        return self.onnx.helper.make_node("Identity", [source], [target])

    def _check(self, model: Any) -> None:
        onnx = self.onnx
        try:
            onnx.checker.check_model(model, full_check=True)
            inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise CaffeEvoError(
                f"the ONNX model fails onnx.checker: {str(exc).splitlines()[0]} (a caffe-evo bug)"
            ) from None
        for value in inferred.graph.output:
            dims = [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]
            want = [BATCH, *self.shape(value.name)[1:]]
            if dims != want:
                raise CaffeEvoError(
                    f"ONNX output '{value.name}' has shape {dims}, Caffe's is {want} (a caffe-evo bug)"
                )

    # -- layers (bottoms/tops are tensor names) --

    def _spatial(self, layer: Any, param: Any) -> dict[str, Any]:
        return {
            "kernel": _pair(param, "kernel_size", "kernel", 0),
            "pad": _pair(param, "pad", "pad", 0),
            "stride": _pair(param, "stride", "stride", 1),
        }

    def _convolution(self, layer: Any, bottoms: list[str], tops: list[str]) -> None:
        self._conv("Conv", layer, bottoms, tops)

    def _deconvolution(self, layer: Any, bottoms: list[str], tops: list[str]) -> None:
        self._conv("ConvTranspose", layer, bottoms, tops)

    def _conv(self, op: str, layer: Any, bottoms: list[str], tops: list[str]) -> None:
        param = layer.convolution_param
        params = self.params(layer)
        if len(bottoms) != 1 or param.axis != 1 or params[0].ndim != 4:
            raise _unsupported(layer, "other than one 2-D spatial input (axis 1)")
        s = self._spatial(layer, param)
        inputs = [bottoms[0], self.const(f"{layer.name}_w", params[0], layer)]
        if param.bias_term:
            inputs.append(self.const(f"{layer.name}_b", params[1], layer))
        ph, pw = s["pad"]
        self.node(
            op,
            inputs,
            tops[0],
            layer,
            kernel_shape=list(params[0].shape[2:]),
            pads=[ph, pw, ph, pw],
            strides=list(s["stride"]),
            dilations=(list(param.dilation) * 2)[-2:] if param.dilation else [1, 1],
            group=param.group,
        )

    def _innerproduct(self, layer: Any, bottoms: list[str], tops: list[str]) -> None:
        param = layer.inner_product_param
        if param.axis != 1:
            raise _unsupported(layer, f"axis {param.axis} (only 1: everything after the batch axis)")
        params = self.params(layer)
        x = bottoms[0]
        if len(self.shape(layer.bottom[0])) != 2:  # Caffe's implicit flatten
            x = self.node("Flatten", [x], None, layer, axis=1)
        inputs = [x, self.const(f"{layer.name}_w", params[0], layer)]
        if param.bias_term:
            inputs.append(self.const(f"{layer.name}_b", params[1], layer))
        self.node("Gemm", inputs, tops[0], layer, transB=0 if param.transpose else 1)

    def _pooling(self, layer: Any, bottoms: list[str], tops: list[str]) -> None:
        param = layer.pooling_param
        if len(tops) != 1:
            raise _unsupported(layer, "a second (mask) top")
        if param.pool not in (param.MAX, param.AVE):
            raise _unsupported(layer, "STOCHASTIC pooling")
        shape = self.shape(layer.bottom[0])
        if len(shape) != 4:
            raise _unsupported(layer, f"a {len(shape)}-D input")
        if param.global_pooling:
            op = "GlobalMaxPool" if param.pool == param.MAX else "GlobalAveragePool"
            self.node(op, bottoms, tops[0], layer)
            return
        s = self._spatial(layer, param)
        out = tuple(
            pooled_size(n, k, st, p)
            for n, k, st, p in zip(shape[2:], s["kernel"], s["stride"], s["pad"], strict=True)
        )
        if out != self.shape(layer.top[0])[2:]:
            raise CaffeEvoError(f"layer '{layer.name}': pooled size {out} is not Caffe's (a caffe-evo bug)")
        if any(
            (o - 1) * st - p >= n for n, st, p, o in zip(shape[2:], s["stride"], s["pad"], out, strict=True)
        ):
            # Unpadded, stride > kernel: Caffe's last window lies wholly outside the input and it outputs
            # -FLT_MAX (MAX) or 0/0 (AVE) there; no ONNX pooling computes that.
            raise _unsupported(
                layer, "a last window wholly outside the input (Caffe outputs -FLT_MAX or NaN there)"
            )
        end = [
            max(0, (o - 1) * st + k - n - p)
            for n, k, st, p, o in zip(shape[2:], s["kernel"], s["stride"], s["pad"], out, strict=True)
        ]
        attrs = {"kernel_shape": list(s["kernel"]), "strides": list(s["stride"]), "pads": [*s["pad"], *end]}
        if param.pool == param.MAX:
            self.node("MaxPool", bottoms, tops[0], layer, **attrs)
            return
        factor = average_divisor_map(shape[2:], s["kernel"], s["stride"], s["pad"], out)
        if np.all(factor == 1):
            self.node("AveragePool", bottoms, tops[0], layer, count_include_pad=0, **attrs)
            return
        pooled = self.node("AveragePool", bottoms, None, layer, count_include_pad=0, **attrs)
        self.node(
            "Mul", [pooled, self.const(f"{layer.name}_divisor", factor[None, None], layer)], tops[0], layer
        )

    def _channel_shape(self, layer: Any, values: np.ndarray) -> np.ndarray:
        """Per-channel values shaped to broadcast over axis 1 of the layer's input."""
        rank = len(self.shape(layer.bottom[0]))
        return values.reshape(values.shape[0], *[1] * (rank - 2)) if values.size > 1 else values.reshape(1)

    def _relu(self, layer: Any, bottoms: list[str], tops: list[str]) -> None:
        slope = layer.relu_param.negative_slope
        if slope:
            self.node("LeakyRelu", bottoms, tops[0], layer, alpha=slope)
        else:
            self.node("Relu", bottoms, tops[0], layer)

    def _prelu(self, layer: Any, bottoms: list[str], tops: list[str]) -> None:
        slope = self.params(layer)[0]
        self.node(
            "PRelu",
            [bottoms[0], self.const(f"{layer.name}_slope", self._channel_shape(layer, slope), layer)],
            tops[0],
            layer,
        )

    def _dropout(self, layer: Any, bottoms: list[str], tops: list[str]) -> None:
        self.node("Identity", bottoms, tops[0], layer)  # Caffe's TEST pass

    def _batchnorm(self, layer: Any, bottoms: list[str], tops: list[str]) -> None:
        bn = layer.batch_norm_param
        if bn.HasField("use_global_stats") and not bn.use_global_stats:
            raise _unsupported(layer, "batch statistics at test time (use_global_stats: false)")
        mean, var, factor = self.params(layer)
        factor = 0.0 if factor[0] == 0 else 1.0 / factor[0]
        channels = len(mean)
        scale = self.const(f"{layer.name}_scale", np.ones(channels), layer)
        bias = self.const(f"{layer.name}_bias", np.zeros(channels), layer)
        inputs = [bottoms[0], scale, bias, self.const(f"{layer.name}_mean", mean * factor, layer)]
        inputs.append(self.const(f"{layer.name}_var", var * factor, layer))
        self.node("BatchNormalization", inputs, tops[0], layer, epsilon=bn.eps)
        self.bn_of[tops[0]] = (scale, bias)

    def _affine(self, layer: Any, bottoms: list[str], tops: list[str], gamma: Any, beta: Any) -> None:
        source = bottoms[0]
        if source in self.bn_of and self.reads[source] == 1 and source not in self.final.values():
            # The Scale alone reads this BatchNorm: fold it into the BatchNormalization node.
            node, (scale, bias) = self.producer.pop(source), self.bn_of.pop(source)
            by_name = {init.name: init for init in self.initializers}
            for name, values in ((scale, gamma), (bias, beta)):
                if values is not None:
                    array = self.cast(layer, values)
                    by_name[name].CopyFrom(self.onnx.numpy_helper.from_array(array, name))
            node.output[0] = tops[0]
            self.producer[tops[0]] = node
            return
        steps = []
        if gamma is not None:
            steps.append(("Mul", self.const(f"{layer.name}_gamma", self._channel_shape(layer, gamma), layer)))
        if beta is not None:
            steps.append(("Add", self.const(f"{layer.name}_beta", self._channel_shape(layer, beta), layer)))
        self.chain(steps, source, tops[0], layer)

    def _scale_axes(self, layer: Any, param: Any, bottoms: list[str]) -> None:
        if len(bottoms) != 1 or param.axis != 1 or param.num_axes != 1:
            raise _unsupported(layer, "a second bottom, or axis and num_axes other than 1")

    def _scale(self, layer: Any, bottoms: list[str], tops: list[str]) -> None:
        param = layer.scale_param
        self._scale_axes(layer, param, bottoms)
        params = self.params(layer)
        self._affine(layer, bottoms, tops, params[0], params[1] if param.bias_term else None)

    def _bias(self, layer: Any, bottoms: list[str], tops: list[str]) -> None:
        self._scale_axes(layer, layer.bias_param, bottoms)
        self._affine(layer, bottoms, tops, None, self.params(layer)[0])

    def _reshape_to(self, layer: Any, bottoms: list[str], tops: list[str]) -> None:
        """Reshape to Caffe's top shape, the batch axis copied (0)."""
        after = self.shape(layer.top[0])
        self.node("Reshape", [bottoms[0], self.ints(f"{layer.name}_shape", [0, *after[1:]])], tops[0], layer)

    def _flatten(self, layer: Any, bottoms: list[str], tops: list[str]) -> None:
        param = layer.flatten_param
        rank = len(self.shape(layer.bottom[0]))
        if param.axis % rank == 0:
            raise _unsupported(layer, "flattening the batch axis")
        if param.axis % rank == 1 and param.end_axis % rank == rank - 1:
            self.node("Flatten", bottoms, tops[0], layer, axis=1)
        else:
            self._reshape_to(layer, bottoms, tops)

    def _reshape(self, layer: Any, bottoms: list[str], tops: list[str]) -> None:
        param = layer.reshape_param
        keeps_batch = param.axis % len(self.shape(layer.bottom[0])) > 0 or (
            len(param.shape.dim) and param.shape.dim[0] == 0
        )
        if not keeps_batch:
            raise _unsupported(layer, "reshaping the batch axis (use dim: 0 first)")
        self._reshape_to(layer, bottoms, tops)

    def _split(self, layer: Any, bottoms: list[str], tops: list[str]) -> None:
        for top in tops:
            self.node("Identity", bottoms, top, layer)

    def _slice(self, layer: Any, bottoms: list[str], tops: list[str]) -> None:
        param = layer.slice_param
        shape = self.shape(layer.bottom[0])
        axis = (param.slice_dim if param.HasField("slice_dim") else param.axis) % len(shape)
        if axis == 0:
            raise _unsupported(layer, "slicing the batch axis")
        sizes = [self.shape(top)[axis] for top in layer.top]
        start = 0
        axes = self.ints(f"{layer.name}_axes", [axis])
        for top, size in zip(tops, sizes, strict=True):
            starts, ends = (
                self.ints(f"{layer.name}_start", [start]),
                self.ints(f"{layer.name}_end", [start + size]),
            )
            self.node("Slice", [bottoms[0], starts, ends, axes], top, layer)
            start += size

    def _concat(self, layer: Any, bottoms: list[str], tops: list[str]) -> None:
        param = layer.concat_param
        axis = param.concat_dim if param.HasField("concat_dim") else param.axis
        self.node("Concat", bottoms, tops[0], layer, axis=axis)

    def _eltwise(self, layer: Any, bottoms: list[str], tops: list[str]) -> None:
        param = layer.eltwise_param
        if param.operation == param.MAX:
            self.node("Max", bottoms, tops[0], layer)
            return
        terms = list(bottoms)
        if param.operation == param.SUM:
            coeffs = list(param.coeff) or [1.0] * len(bottoms)
            if len(coeffs) != len(bottoms):
                raise _unsupported(layer, f"{len(coeffs)} coefficients for {len(bottoms)} bottoms")
            terms = [
                x
                if c == 1
                else self.node("Mul", [x, self.const(f"{layer.name}_coeff", c, layer)], None, layer)
                for x, c in zip(bottoms, coeffs, strict=True)
            ]
        op = "Add" if param.operation == param.SUM else "Mul"
        value = terms[0]
        for i, term in enumerate(terms[1:], start=1):  # Caffe's order
            value = self.node(op, [value, term], tops[0] if i == len(terms) - 1 else None, layer)
        if len(terms) == 1:
            self.node("Identity", [value], tops[0], layer)

    def _softmax(self, layer: Any, bottoms: list[str], tops: list[str]) -> None:
        shape = self.shape(layer.bottom[0])
        axis = layer.softmax_param.axis % len(shape)
        if self.options.opset < 13 and math.prod(shape[axis + 1 :]) != 1:
            raise CaffeEvoError(
                f"layer '{layer.name}' (Softmax): a softmax over axis {axis} of a {shape} blob needs "
                f"opset 13 or later (before 13 ONNX's Softmax flattens the axes after it); "
                f"got --opset {self.options.opset}"
            )
        self.node("Softmax", bottoms, tops[0], layer, axis=axis)

    def _lrn(self, layer: Any, bottoms: list[str], tops: list[str]) -> None:
        param = layer.lrn_param
        size = param.local_size
        if param.norm_region == param.ACROSS_CHANNELS:
            self.node(
                "LRN", bottoms, tops[0], layer, size=size, alpha=param.alpha, beta=param.beta, bias=param.k
            )
            return
        # WITHIN_CHANNEL as Caffe composes it: x * (1 + alpha * avgpool(x^2))^-beta (k is not used).
        x = bottoms[0]
        pad = (size - 1) // 2
        square = self.node("Mul", [x, x], None, layer)
        pooled = self.node(
            "AveragePool",
            [square],
            None,
            layer,
            kernel_shape=[size, size],
            pads=[pad] * 4,
            count_include_pad=1,
        )
        scaled = self.node(
            "Mul", [pooled, self.const(f"{layer.name}_alpha", param.alpha, layer)], None, layer
        )
        shifted = self.node("Add", [scaled, self.const(f"{layer.name}_one", 1.0, layer)], None, layer)
        factor = self.node(
            "Pow", [shifted, self.const(f"{layer.name}_beta", -param.beta, layer)], None, layer
        )
        self.node("Mul", [x, factor], tops[0], layer)

    def _power(self, layer: Any, bottoms: list[str], tops: list[str]) -> None:
        param = layer.power_param  # (shift + scale * x) ^ power
        steps = []
        if param.scale != 1:
            steps.append(("Mul", self.const(f"{layer.name}_scale", param.scale, layer)))
        if param.shift != 0:
            steps.append(("Add", self.const(f"{layer.name}_shift", param.shift, layer)))
        if param.power != 1:
            steps.append(("Pow", self.const(f"{layer.name}_power", param.power, layer)))
        self.chain(steps, bottoms[0], tops[0], layer)

    def _sigmoid(self, layer: Any, bottoms: list[str], tops: list[str]) -> None:
        self.node("Sigmoid", bottoms, tops[0], layer)

    def _tanh(self, layer: Any, bottoms: list[str], tops: list[str]) -> None:
        self.node("Tanh", bottoms, tops[0], layer)

    def _absval(self, layer: Any, bottoms: list[str], tops: list[str]) -> None:
        self.node("Abs", bottoms, tops[0], layer)


def convert(proto: Any, net: Any, options: ExportOptions | None = None) -> Any:
    """The ``onnx.ModelProto`` of a Caffe net: ``proto`` (its NetParameter) with the weights of the pycaffe
    TEST ``net`` built from it."""
    options = options or ExportOptions()
    options.check()
    if proto.layers:
        raise CaffeEvoError("V1 `layers` format; upgrade it with Caffe's upgrade_net_proto_text")
    return _Converter(proto, net, options).convert()
