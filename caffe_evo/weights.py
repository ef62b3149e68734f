"""Reading and checking ``.caffemodel`` files before Caffe sees them.

Caffe aborts the whole process (glog ``CHECK``) on a corrupt file or a shape mismatch, so these checks
run in Python first and turn every such problem into one :class:`CaffeEvoError` line.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from caffe_evo.caffe_env import caffe_pb2, check_nets_build, load_caffe
from caffe_evo.errors import CaffeEvoError


def blob_shape(blob: Any) -> tuple[int, ...]:
    """Shape of a BlobProto, including the legacy num/channels/height/width form."""
    if blob.HasField("shape"):
        return tuple(blob.shape.dim)
    return tuple(d for d in (blob.num, blob.channels, blob.height, blob.width))


def read_caffemodel(path: Path) -> Any:
    """Parse a binary caffemodel into a NetParameter, or fail with one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CaffeEvoError(f"{path}: weights file not found")
    net = caffe_pb2().NetParameter()
    try:
        net.ParseFromString(path.read_bytes())
    except DecodeError as exc:
        raise CaffeEvoError(f"{path}: not a valid caffemodel ({exc})") from None
    layers = net.layer or net.layers  # V1 models keep their layers in `layers`
    if not any(layer.blobs for layer in layers):
        raise CaffeEvoError(f"{path}: not a valid caffemodel (no layer holds weights)")
    for layer in layers:
        for i, blob in enumerate(layer.blobs):
            shape = blob_shape(blob)
            count = math.prod(shape)
            stored = len(blob.data) or len(blob.double_data)
            if stored != count:
                raise CaffeEvoError(
                    f"{path}: layer '{layer.name}' blob {i} holds {stored} values for shape {shape}"
                )
    return net


def check_matches(net: Any, weights: Any, weights_path: Path, prototxt: Path) -> None:
    """Every learnable layer of the pycaffe ``net`` must be in ``weights`` with the same blob shapes."""
    stored = {layer.name: layer for layer in (weights.layer or weights.layers)}
    for name, params in net.params.items():
        layer = stored.get(name)
        if layer is None:
            raise CaffeEvoError(f"{weights_path} does not match {prototxt}: no weights for layer '{name}'")
        if len(layer.blobs) != len(params):
            raise CaffeEvoError(
                f"{weights_path} does not match {prototxt}: layer '{name}' has {len(layer.blobs)} "
                f"blobs in the weights, {len(params)} in the net"
            )
        for i, (blob, param) in enumerate(zip(layer.blobs, params, strict=False)):
            have, want = blob_shape(blob), tuple(param.data.shape)
            # Caffe accepts legacy 4-D shapes whose element count matches; so do we.
            if have != want and math.prod(have) != math.prod(want):
                raise CaffeEvoError(
                    f"{weights_path} does not match {prototxt}: layer '{name}' blob {i} is {have} "
                    f"in the weights, {want} in the net"
                )


def load_net(deploy: Path, weights: Path | None) -> Any:
    """A pycaffe TEST net of ``deploy`` holding ``weights``, after the checks that spare Caffe an abort."""
    if not deploy.is_file():
        raise CaffeEvoError(f"{deploy}: file not found")
    stored = None if weights is None else read_caffemodel(weights)
    check_nets_build([(deploy, "TEST")], str(deploy))
    caffe = load_caffe()
    net = caffe.Net(str(deploy), caffe.TEST)
    if weights is not None:
        check_matches(net, stored, weights, deploy)
        net.copy_from(str(weights))
    return net
