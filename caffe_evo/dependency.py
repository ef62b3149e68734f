"""The channel-dependency graph of a Caffe net, and the evolution's dependency step built on it.

Like Torch-Pruning's dependency graph, this says which channels are tied together and which must stay;
what is then done with that is elsewhere: :func:`drop_unread` (here) removes the synapses that cannot change
the output, :mod:`caffe_evo.deploy.compaction` rewrites the net without the removable channels.

Channels are tracked as classes: a channel-wise layer (ReLU, BatchNorm, Pooling, ...) passes channel i
to channel i, Concat stacks its inputs' channels, and Eltwise ties channel i of all its inputs and its
output together. A class is removed whole or kept whole, so every blob keeps a consistent channel set.
A channel is also followed as a constant where it is one (a neuron without living synapses outputs its
bias; ReLU, BatchNorm, Scale, pooling, ... map it to another constant), so that a reader can fold it
into its own bias; folding into a Convolution needs ``pad == 0``, so that every output sees the whole
kernel, and a zero constant needs no folding at all. Net inputs and outputs, and the inputs of layers
that mix channels (Softmax, LRN ACROSS_CHANNELS), are kept, as are the channels a grouped convolution
needs for equal groups and one channel of any blob that would otherwise be empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from caffe_evo.caffe_env import caffe_pb2, load_caffe
from caffe_evo.encoding import Masks, bias_mask
from caffe_evo.errors import CaffeEvoError
from caffe_evo.recipe import parse_prototxt
from caffe_evo.weights import load_net

WEIGHTED = ("Convolution", "InnerProduct")
# Besides these, Concat and Eltwise: every other layer maps input channel i to output channel i, except
# Softmax and LRN ACROSS_CHANNELS, which mix channels and so keep all of theirs.
SUPPORTED = frozenset(
    "Input Convolution InnerProduct Concat Eltwise Softmax "
    "ReLU PReLU Dropout BatchNorm Scale Bias Flatten Split Pooling LRN Sigmoid Power".split()
)
# Layers whose output channel i comes from input channel i (or, for Concat, one input's channel): an
# output of a Convolution/InnerProduct that reaches a net output through these is one of the net's outputs.
# Beyond SUPPORTED, the element-wise activations that output heads end with (e.g. DetectNet's coverage).
_CHANNEL_PRESERVING = (SUPPORTED - {"Input", *WEIGHTED}) | frozenset(
    "Sigmoid TanH AbsVal Power Exp Log ELU BNLL Clip Swish".split()
)


def _in_test_phase(layer: Any) -> bool:
    test = caffe_pb2().TEST
    if any(rule.HasField("phase") and rule.phase == test for rule in layer.exclude):
        return False
    return not layer.include or any(
        not rule.HasField("phase") or rule.phase == test for rule in layer.include
    )


def output_layers(proto: Any) -> frozenset[str]:
    """The Convolution/InnerProduct layers of the NetParameter ``proto`` (a deploy net) whose outputs
    reach a net output (a blob no later layer reads) through channel-preserving layers only: a
    classifier, or each head of a detection net (coverage and bbox). These must never lose an output."""
    reaching: dict[str, frozenset[str]] = {}  # blob -> weighted layers whose channels it carries
    unread: set[str] = set(proto.input)
    for layer in proto.layer:
        if not _in_test_phase(layer):
            continue
        if layer.type in WEIGHTED:
            carried = frozenset({layer.name})
        elif layer.type in _CHANNEL_PRESERVING:
            carried = frozenset().union(*(reaching.get(name, frozenset()) for name in layer.bottom))
        else:
            carried = frozenset()
        unread.difference_update(layer.bottom)
        for top in layer.top:
            reaching[top] = carried
            unread.add(top)
    return frozenset().union(*(reaching.get(name, frozenset()) for name in unread))


def keep_outputs(
    masks: Masks,
    parent: Masks,
    preference: dict[str, np.ndarray],
    outputs: frozenset[str],
    readable: Masks | None = None,
) -> Masks:
    """``masks`` where every output neuron of an ``outputs`` layer that the parent had and that lost all
    its input synapses gets one back: its most preferred parent synapse among those that read a living
    channel (``readable``, weight-shaped; None = every parent synapse), else its most preferred at all,
    which keeps at least its bias. The one protection rule of every mask-editing step.

    ``preference`` is weight-shaped and >= 0: the synapse probabilities, or |w| (the same order in a layer).
    """
    result = dict(masks)
    for name in outputs & masks.keys():
        rows, was = masks[name].reshape(len(masks[name]), -1), parent[name].reshape(len(masks[name]), -1)
        lost = np.flatnonzero(was.any(axis=1) & ~rows.any(axis=1))
        if not lost.size:
            continue
        score = np.where(was, preference[name].reshape(was.shape), -np.inf)
        usable = was if readable is None else was & readable[name].reshape(was.shape)
        best = np.where(
            usable.any(axis=1), np.where(usable, score, -np.inf).argmax(axis=1), score.argmax(axis=1)
        )
        rows = rows.copy()
        rows[lost, best[lost]] = True
        result[name] = rows.reshape(masks[name].shape)
    return result


@dataclass
class Blob:
    """One value of a named blob: an in-place layer (top == bottom) makes a new version of the same name."""

    name: str
    channels: int
    inner: int  # values per channel and sample (H*W); Flatten keeps it, so InnerProduct finds its blocks
    nodes: np.ndarray  # the channel-class node of each channel
    const: np.ndarray  # per channel: its value if that is one constant for every input and position, else NaN


@dataclass
class Step:
    """A layer with the blob versions it reads and writes, and for Convolution/InnerProduct what it reads."""

    layer: Any  # caffe_pb2.LayerParameter
    bottoms: list[Blob]
    params: list[np.ndarray]
    tops: list[Blob] | None = None
    blocking: np.ndarray | None = None  # (out, C): output j reads input channel i and cannot fold it
    fold: np.ndarray | None = None  # input channels holding a non-zero constant that can be folded
    fold_sums: np.ndarray | None = None  # (out, len(fold)): output j's weight sum over each such channel


def _unsupported(layer: Any, why: str) -> CaffeEvoError:
    return CaffeEvoError(f"layer '{layer.name}' ({layer.type}): {why}; compaction does not support it")


def _single_bottom(step: Step) -> Blob:
    layer = step.layer
    if len(step.bottoms) != 1 or (len(layer.top) != 1 and layer.type != "Split"):
        raise _unsupported(layer, f"{len(step.bottoms)} bottoms and {len(layer.top)} tops")
    return step.bottoms[0]


def per_input_channel(step: Step, values: np.ndarray, channels: np.ndarray, reduce: Any) -> np.ndarray:
    """``reduce`` of each output's weight-shaped ``values`` over the taps of each input channel in
    ``channels``: shape (out, len(channels)), 0 where a channel lies outside the output's group."""
    bottom, out = step.bottoms[0], values.shape[0]
    if step.layer.type == "InnerProduct":
        return reduce(values.reshape(out, bottom.channels, bottom.inner)[:, channels], axis=2)
    groups = step.layer.convolution_param.group
    per_group = bottom.channels // groups
    same_group = (np.arange(out)[:, None] // (out // groups)) == (channels // per_group)[None, :]
    return reduce(values.reshape(out, per_group, -1)[:, channels % per_group], axis=2) * same_group


def _padded(layer: Any) -> bool:
    param = layer.convolution_param if layer.type == "Convolution" else layer.pooling_param
    pads = list(param.pad) if layer.type == "Convolution" else [param.pad]
    return any(pads) or bool(param.pad_h or param.pad_w)


class ChannelGraph:
    """Blob versions, channel classes and constants of a net, then which classes must stay."""

    def __init__(self, proto: Any, net: Any) -> None:
        self._parent: list[int] = []
        self.blobs: list[Blob] = []
        self.steps: list[Step] = []
        self.notes: list[str] = []
        self._kept_for: dict[str, int] = {}  # layer -> channels kept only to keep its groups equal
        seeds: list[Blob] = []  # blobs whose channels all stay
        current: dict[str, Blob] = {}
        for name in proto.input:  # legacy `input:` fields
            current[name] = self._fresh(name, net.blobs[name].data.shape)
            seeds.append(current[name])
        built = set(net._layer_names)
        for layer in proto.layer:
            if layer.name not in built:  # excluded from the TEST phase
                continue
            params = [blob.data for blob in net.params[layer.name]] if layer.name in net.params else []
            step = Step(layer, [current[name] for name in layer.bottom], params)
            step.tops = self._transfer(step, net, seeds)
            current.update((top.name, top) for top in step.tops)
            self.steps.append(step)
        seeds += [current[name] for name in net.outputs]
        self._root = np.array([self._find(node) for node in range(len(self._parent))], dtype=np.int64)
        self._pinned = np.zeros(len(self._parent), dtype=bool)
        for blob in seeds:
            self.pin(blob, np.arange(blob.channels))

    # -- channel classes (union-find over nodes) --

    def _new_nodes(self, count: int) -> np.ndarray:
        start = len(self._parent)
        self._parent.extend(range(start, start + count))
        return np.arange(start, start + count)

    def _find(self, node: int) -> int:
        while self._parent[node] != node:
            self._parent[node] = self._parent[self._parent[node]]
            node = self._parent[node]
        return node

    def _fresh(self, name: str, shape: tuple[int, ...], const: np.ndarray | None = None) -> Blob:
        channels = shape[1] if len(shape) > 1 else 1
        const = np.full(channels, np.nan) if const is None else const
        blob = Blob(name, channels, math.prod(shape[2:]), self._new_nodes(channels), const)
        self.blobs.append(blob)
        return blob

    def _derived(self, name: str, nodes: np.ndarray, inner: int, const: np.ndarray) -> Blob:
        """A blob whose channels are (tied to) channels of blobs before it."""
        blob = Blob(name, len(nodes), inner, nodes, const)
        self.blobs.append(blob)
        return blob

    def keep(self, blob: Blob) -> np.ndarray:
        return self._pinned[self._root[blob.nodes]]

    def pin(self, blob: Blob, channels: np.ndarray) -> bool:
        """Keep these channels' classes; True if that changed anything."""
        roots = self._root[blob.nodes[channels]]
        changed = not self._pinned[roots].all()
        self._pinned[roots] = True
        return changed

    # -- forward pass: shapes, classes, constants --

    def _transfer(self, step: Step, net: Any, seeds: list[Blob]) -> list[Blob]:
        layer, kind = step.layer, step.layer.type
        if kind == "Input":
            tops = [self._fresh(name, net.blobs[name].data.shape) for name in layer.top]
            seeds.extend(tops)
            return tops
        if kind in WEIGHTED:
            return [self._weighted(step, net.blobs[layer.top[0]].data.shape)]
        if kind == "Concat":
            return [self._concat(step)]
        if kind == "Eltwise":
            return [self._eltwise(step)]
        bottom = _single_bottom(step)
        if kind == "Softmax" or (
            kind == "LRN" and layer.lrn_param.norm_region == layer.lrn_param.ACROSS_CHANNELS
        ):
            seeds.append(bottom)
            if kind == "LRN":
                self.notes.append(
                    f"{layer.name}: LRN ACROSS_CHANNELS mixes neighbouring channels, so the "
                    f"{bottom.channels} channels flowing into it are kept"
                )
        const = np.full(bottom.channels, np.nan) if kind == "Softmax" else self._channel_const(step, bottom)
        # Pooling changes H*W; Flatten keeps its input's per-channel blocks for the InnerProduct after it.
        inner = {name: math.prod(net.blobs[name].data.shape[2:]) for name in layer.top}
        return [
            self._derived(name, bottom.nodes, bottom.inner if kind == "Flatten" else inner[name], const)
            for name in layer.top
        ]

    def _channel_const(self, step: Step, bottom: Blob) -> np.ndarray:
        """The constant channels after a channel-wise layer (float64, as exact as Caffe's float32 allows)."""
        layer, c, params = step.layer, bottom.const, [p.astype(np.float64) for p in step.params]
        per_channel = {"BatchNorm": params[:2], "Scale": params, "Bias": params}.get(layer.type, [])
        if layer.type == "PReLU" and not layer.prelu_param.channel_shared:
            per_channel = params
        if any(p.shape != (bottom.channels,) for p in per_channel):
            raise _unsupported(layer, f"parameters are not one per channel of its {bottom.channels} channels")
        if layer.type in ("Scale", "Bias"):
            param = layer.scale_param if layer.type == "Scale" else layer.bias_param
            if param.axis != 1 or param.num_axes != 1:
                raise _unsupported(layer, "axis and num_axes other than 1")
        if layer.type == "ReLU":
            return np.where(c > 0, c, c * layer.relu_param.negative_slope)
        if layer.type == "PReLU":
            return np.where(c > 0, c, c * params[0])
        if layer.type == "BatchNorm":
            bn = layer.batch_norm_param
            if bn.HasField("use_global_stats") and not bn.use_global_stats:
                raise _unsupported(layer, "batch statistics at test time (use_global_stats: false)")
            factor = 0.0 if params[2][0] == 0 else 1.0 / params[2][0]
            return (c - params[0] * factor) / np.sqrt(params[1] * factor + bn.eps)
        if layer.type == "Scale":
            return c * params[0] + (params[1] if len(params) > 1 else 0.0)
        if layer.type == "Bias":
            return c + params[0]
        if layer.type == "Flatten" and (layer.flatten_param.axis != 1 or layer.flatten_param.end_axis != -1):
            raise _unsupported(layer, "flattening other than all axes after the channels")
        if layer.type == "Pooling":
            pool = layer.pooling_param
            if len(layer.top) != 1:
                raise _unsupported(layer, "a second (mask) top")
            # MAX only looks at positions inside the image; AVE divides by a window that counts the padding.
            if pool.pool == pool.MAX or (pool.pool == pool.AVE and not _padded(layer)):
                return c
        if layer.type in ("Pooling", "LRN"):
            return np.where(c == 0, 0.0, np.nan)  # a zero channel stays zero; other constants blur at borders
        if layer.type == "Sigmoid":  # DetectNet's coverage head
            return 1.0 / (1.0 + np.exp(-c))
        if layer.type == "Power":  # DetectNet's deploy-time mean subtraction
            power = layer.power_param
            return (power.shift + power.scale * c) ** power.power
        return c  # Dropout (the identity at test time), Flatten, Split

    def _weighted(self, step: Step, top_shape: tuple[int, ...]) -> Blob:
        layer, bottom = step.layer, _single_bottom(step)
        conv = layer.type == "Convolution"
        param = layer.convolution_param if conv else layer.inner_product_param
        if param.axis != 1 or (not conv and param.transpose):
            raise _unsupported(layer, "axis other than 1 or transposed weights")
        weights = step.params[0]
        if not conv and weights.shape[1] != bottom.channels * bottom.inner:
            raise _unsupported(
                layer, f"{weights.shape[1]} inputs for {bottom.channels}x{bottom.inner} values"
            )
        c = bottom.const
        foldable = (c == 0) if conv and _padded(layer) else np.isfinite(c)
        step.blocking = per_input_channel(step, weights != 0, np.arange(bottom.channels), np.any) & ~foldable
        step.fold = np.flatnonzero(foldable & (c != 0))
        step.fold_sums = per_input_channel(step, weights, step.fold, partial(np.sum, dtype=np.float64))
        bias = step.params[1].astype(np.float64) if param.bias_term else 0.0
        const = np.where(step.blocking.any(axis=1), np.nan, bias + step.fold_sums @ c[step.fold])
        return self._fresh(layer.top[0], top_shape, const)

    def _concat(self, step: Step) -> Blob:
        layer, bottoms = step.layer, step.bottoms
        param = layer.concat_param
        axis = param.concat_dim if param.HasField("concat_dim") else param.axis
        if axis != 1 or len({b.inner for b in bottoms}) != 1 or len(layer.top) != 1:
            raise _unsupported(layer, "concatenation other than of equally shaped channels (axis 1)")
        const = np.concatenate([b.const for b in bottoms])
        return self._derived(
            layer.top[0], np.concatenate([b.nodes for b in bottoms]), bottoms[0].inner, const
        )

    def _eltwise(self, step: Step) -> Blob:
        layer, bottoms = step.layer, step.bottoms
        if len(layer.top) != 1:
            raise _unsupported(layer, f"{len(layer.top)} tops")
        for other in bottoms[1:]:  # channel i of every input is removed together or kept together
            for a, b in zip(bottoms[0].nodes, other.nodes, strict=True):
                self._parent[self._find(int(b))] = self._find(int(a))
        consts, param = np.stack([b.const for b in bottoms]), layer.eltwise_param
        if param.operation == param.PROD:
            const = np.where((consts == 0).any(axis=0), 0.0, consts.prod(axis=0))
        elif param.operation == param.SUM:
            coeffs = np.array(list(param.coeff) or [1.0] * len(bottoms), dtype=np.float64)
            const = coeffs @ consts
        else:
            const = consts.max(axis=0)
        return self._derived(layer.top[0], bottoms[0].nodes, bottoms[0].inner, const)

    # -- decision: the smallest set of kept classes that serves every reader --

    def decide(self) -> None:
        """Keep what kept outputs read and cannot fold, balanced groups, and one channel per blob."""
        weighted = [s for s in reversed(self.steps) if s.blocking is not None]
        grouped = [
            s for s in weighted if s.layer.type == "Convolution" and s.layer.convolution_param.group > 1
        ]
        changed = True
        while changed:
            changed = False
            for step in weighted:
                needed = step.blocking[self.keep(step.tops[0])].any(axis=0)
                changed |= self.pin(step.bottoms[0], np.flatnonzero(needed))
            for step in grouped:
                for blob in (step.bottoms[0], step.tops[0]):
                    changed |= self._balance(blob, step.layer)
            for blob in self.blobs:
                if blob.channels and not self.keep(blob).any():
                    self.notes.append(f"blob '{blob.name}': every channel was removable; channel 0 kept")
                    changed |= self.pin(blob, np.array([0]))
        self.notes += [
            f"{name}: {count} removable channel(s) kept so that its groups stay equal"
            for name, count in self._kept_for.items()
        ]

    def _balance(self, blob: Blob, layer: Any) -> bool:
        """Caffe needs as many channels in every group: keep removable ones where a group has fewer."""
        keep = self.keep(blob).reshape(layer.convolution_param.group, -1)
        short = keep.sum(axis=1).max() - keep.sum(axis=1)
        extra = [
            np.flatnonzero(~row)[:n] + g * keep.shape[1]
            for g, (row, n) in enumerate(zip(keep, short, strict=True))
        ]
        extra_channels = np.concatenate(extra)
        if not len(extra_channels):
            return False
        self._kept_for[layer.name] = self._kept_for.get(layer.name, 0) + len(extra_channels)
        return self.pin(blob, extra_channels)


def _drop_input_channels(step: Step, mask: np.ndarray, channels: np.ndarray) -> None:
    """Clear, in place, every synapse of ``mask`` (the step's weight shape) on these input channels."""
    if step.layer.type == "InnerProduct":
        mask.reshape(mask.shape[0], step.bottoms[0].channels, -1)[:, channels] = False
        return
    out, per_group = mask.shape[0], mask.shape[1]
    rows_per_group = out // step.layer.convolution_param.group
    for channel in channels:
        group = channel // per_group
        mask[group * rows_per_group : (group + 1) * rows_per_group, channel % per_group] = False


def drop_unread(
    deploy: Path,
    params: dict[str, list[np.ndarray]],
    masks: Masks,
    outputs: frozenset[str] = frozenset(),
    parent: Masks | None = None,
) -> Masks:
    """``masks`` without the synapses that cannot change the network's output, until none is left.

    Two kinds: a synapse that reads a channel which is zero for every input (every producer of the
    channel is dead, and the layers in between keep zero at zero), and the synapses of an output channel
    that no living synapse, net output or channel-mixing layer reads. Removing one can make more of them
    (a neuron whose inputs all died is dead itself), hence the repetition. The network then computes
    what it computed before except at neurons left reading only zero channels: they lose their bias too
    (:func:`caffe_evo.encoding.bias_mask`), so their output changes from a constant to zero. Such a
    neuron of an ``outputs`` layer (:func:`output_layers`) is given back one synapse of ``parent``
    (default: ``masks``) on a living channel, its strongest by ``params``' |w| (:func:`keep_outputs`).
    Whether a channel is zero is decided by the structure: living synapses and biases count as non-zero
    whatever their values, so the answer does not depend on the weights of the evolving layers; the
    other layers' parameters (``params``, e.g. BatchNorm statistics) do matter, as BatchNorm turns a zero
    channel into a constant that is not zero.
    """
    deploy = Path(deploy)
    proto = parse_prototxt(deploy, caffe_pb2().NetParameter())
    check_supported(proto, deploy)
    caffe = load_caffe()
    net = caffe.Net(str(deploy), caffe.TEST)
    for name, arrays in params.items():
        for blob, array in zip(net.params[name], arrays, strict=True):
            blob.data[...] = array
    original, masks = masks, {name: mask.copy() for name, mask in masks.items()}
    while True:
        for name, mask in masks.items():
            blobs = net.params[name]
            blobs[0].data[...] = mask
            if len(blobs) > 1:
                blobs[1].data[...] = bias_mask(mask)
        graph = ChannelGraph(proto, net)
        read = graph._pinned.copy()  # per class root: net inputs and outputs, channel-mixing inputs
        weighted = [step for step in graph.steps if step.blocking is not None]
        for step in weighted:
            living = step.params[0] != 0
            rows = living.reshape(len(living), -1).any(axis=1)
            bottom = step.bottoms[0]
            reads = per_input_channel(step, living, np.arange(bottom.channels), np.any)[rows].any(axis=0)
            read[graph._root[bottom.nodes[reads]]] = True
        changed = False
        readable: Masks = {}
        for step in weighted:
            mask = masks.get(step.layer.name)
            if mask is None:
                continue
            before = int(np.count_nonzero(mask))
            zero = np.flatnonzero(step.bottoms[0].const == 0)
            _drop_input_channels(step, mask, zero)
            mask[~read[graph._root[step.tops[0].nodes]]] = False
            changed |= int(np.count_nonzero(mask)) != before
            readable[step.layer.name] = np.ones(mask.shape, dtype=bool)
            _drop_input_channels(step, readable[step.layer.name], zero)
        if not changed:
            # A synapse given back reads a living channel, so it makes no other synapse removable.
            strength = {name: np.abs(params[name][0]) for name in outputs & masks.keys()}
            return keep_outputs(masks, original if parent is None else parent, strength, outputs, readable)


def check_follows(deploy: Path) -> None:
    """Raise the error that the dependency step or compaction would raise on the net ``deploy``, with
    the layers' fillers for weights: the structure decides, so nothing needs to be trained first."""
    proto = parse_prototxt(deploy, caffe_pb2().NetParameter())
    check_supported(proto, deploy)
    ChannelGraph(proto, load_net(Path(deploy), None))


def check_supported(proto: Any, deploy: Path) -> None:
    if proto.layers:
        raise CaffeEvoError(f"{deploy}: V1 `layers` format; upgrade it with Caffe's upgrade_net_proto_text")
    names = [layer.name for layer in proto.layer]
    for layer in proto.layer:
        if names.count(layer.name) > 1:
            raise CaffeEvoError(f"{deploy}: layer name '{layer.name}' is used more than once")
        if layer.type not in SUPPORTED:
            raise CaffeEvoError(
                f"layer '{layer.name}' has type {layer.type} that compaction does not support"
            )
        if any(spec.name for spec in layer.param):
            raise _unsupported(layer, "parameters shared with other layers")


def tied_channels(deploy: Path, layers: list[str]) -> dict[str, np.ndarray]:
    """Per Convolution/InnerProduct layer of ``layers``, the tied class of each output channel, -1 where
    the channel is tied to no other of these layers' channels (an Eltwise ties channel i of its inputs).

    Only the structure counts, so the net is built with its fillers' values.
    """
    deploy = Path(deploy)
    proto = parse_prototxt(deploy, caffe_pb2().NetParameter())
    check_supported(proto, deploy)
    caffe = load_caffe()
    graph = ChannelGraph(proto, caffe.Net(str(deploy), caffe.TEST))
    roots = {
        step.layer.name: graph._root[step.tops[0].nodes]
        for step in graph.steps
        if step.blocking is not None and step.layer.name in layers
    }
    members = np.concatenate(list(roots.values())) if roots else np.zeros(0, dtype=np.int64)
    shared = np.unique(members, return_counts=True)
    tied = shared[0][shared[1] > 1]
    return {name: np.where(np.isin(r, tied), r, -1) for name, r in roots.items()}
