"""Recipes: a folder of Caffe's own files (``solver.prototxt``, its net, ``deploy.prototxt``).

A recipe stays plain Caffe so that any Caffe tool reads it. Two path rules make it relocatable:
the solver's ``net`` is relative to the recipe folder, and a relative ``data_param.source`` is relative
to the data root (``--data-root``, else ``$CAFFE_EVO_DATA``, else ``./data``). :meth:`Recipe.write_resolved`
writes a copy with absolute paths that the ``caffe`` binary runs from any directory.

A recipe for a dataset that cannot be had here may name a stand-in (``stand_in.yaml``: ``dataset``, the
first folder of its sources, and ``stand_in``, the folder read instead); ``stand_in=True`` loads it so,
and the recipe then carries the stand-in's name, which every result it produces records.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import text_format

from caffe_evo.caffe_env import caffe_pb2
from caffe_evo.errors import CaffeEvoError

SOLVER_FILE = "solver.prototxt"
DEPLOY_FILE = "deploy.prototxt"
TRAIN_VAL_FILE = "train_val.prototxt"
STAND_IN_FILE = "stand_in.yaml"

# Layer types that read a `source` from disk, and the field holding it.
_SOURCE_PARAMS = {"Data": "data_param", "HDF5Data": "hdf5_data_param", "ImageData": "image_data_param"}


def default_data_root() -> Path:
    return Path(os.environ.get("CAFFE_EVO_DATA", "data")).resolve()


def parse_prototxt(path: Path, message: Any) -> Any:
    """Parse a text prototxt into ``message``; a syntax error names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise CaffeEvoError(f"{path}: file not found")
    try:
        text_format.Merge(path.read_text(), message)
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise CaffeEvoError(f"{path}: not a valid {message.DESCRIPTOR.name} prototxt: {exc}") from None
    return message


def to_prototxt(message: Any) -> str:
    return text_format.MessageToString(message)


def _data_sources(net: Any) -> Iterator[tuple[Any, Any]]:
    """Each data layer of ``net`` with the parameter message that holds its ``source``."""
    for layer in net.layer:
        field = _SOURCE_PARAMS.get(layer.type)
        if field is not None:
            yield layer, getattr(layer, field)


def resolve_sources(net: Any, data_root: Path, recipe_name: str) -> None:
    """Make every data layer's ``source`` absolute and check that it exists."""
    for layer, param in _data_sources(net):
        source = Path(param.source)
        resolved = source if source.is_absolute() else data_root / source
        if not resolved.exists():
            hint = " (prepare it with `caffe-evo data ...`)" if not source.is_absolute() else ""
            raise CaffeEvoError(
                f"recipe {recipe_name}: layer '{layer.name}' reads {param.source!r}, "
                f"not found at {resolved}{hint}"
            )
        if layer.type == "Data" and resolved.is_dir() and not (resolved / "data.mdb").is_file():
            raise CaffeEvoError(f"recipe {recipe_name}: layer '{layer.name}': {resolved} is not an LMDB")
        param.source = str(resolved)


def check_python_layers(net: Any, origin: Path, allow: bool) -> None:
    """A ``Python`` layer runs arbitrary user code, so it needs an explicit opt-in."""
    python_layers = [layer.name for layer in net.layer if layer.type == "Python"]
    if python_layers and not allow:
        raise CaffeEvoError(
            f"{origin}: Python layers {', '.join(python_layers)} run user code; "
            "pass --allow-python-layers to accept them"
        )


def read_stand_in(folder: Path) -> tuple[str, str]:
    """``(dataset, stand-in)`` folder names from the recipe's ``stand_in.yaml``."""
    path = folder / STAND_IN_FILE
    if not path.is_file():
        raise CaffeEvoError(f"recipe {folder.name} has no stand-in ({STAND_IN_FILE}); drop --stand-in")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CaffeEvoError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(spec, dict) or not all(isinstance(spec.get(k), str) for k in ("dataset", "stand_in")):
        raise CaffeEvoError(f"{path}: needs the folder names `dataset` and `stand_in`")
    return spec["dataset"], spec["stand_in"]


def use_stand_in(net: Any, dataset: str, stand_in: str) -> None:
    """Point every relative source under ``dataset/`` at ``stand_in/`` instead."""
    for _, param in _data_sources(net):
        parts = Path(param.source).parts
        if parts and parts[0] == dataset:
            param.source = str(Path(stand_in, *parts[1:]))


# Layers whose output has as many channels as their (first known) input; any other type stops the count.
_CHANNEL_WISE = frozenset(
    "ReLU PReLU ELU Sigmoid TanH AbsVal Power BatchNorm Scale Bias Dropout Pooling LRN Split Eltwise".split()
)


def check_layers(net: Any, origin: Path) -> None:
    """What Caffe would answer with an abort, or a net evolution cannot follow, as one line naming the layer.

    BatchNorm's blobs are statistics that its forward pass computes, never learnt (Caffe aborts on a
    non-zero ``lr_mult``); Eltwise adds channel i of every input, so all inputs need as many channels.
    Channel counts are followed through the net as far as the prototxt states them.
    """
    channels: dict[str, int | None] = {}
    for layer in net.layer:
        if layer.type == "BatchNorm" and any(spec.lr_mult != 0 for spec in layer.param):
            raise CaffeEvoError(
                f"{origin}: layer '{layer.name}' (BatchNorm) has a non-zero lr_mult: its blobs are "
                "statistics computed in the forward pass, not learnt; use `param { lr_mult: 0 }` or none"
            )
        inputs = [channels.get(name) for name in layer.bottom]
        if layer.type == "Eltwise" and len({c for c in inputs if c is not None}) > 1:
            counts = ", ".join(f"'{b}' {c}" for b, c in zip(layer.bottom, inputs, strict=True))
            raise CaffeEvoError(
                f"{origin}: layer '{layer.name}' (Eltwise) adds inputs with different channel counts "
                f"({counts})"
            )
        if layer.type in ("Convolution", "Deconvolution"):
            out: int | None = layer.convolution_param.num_output
        elif layer.type == "InnerProduct":
            out = layer.inner_product_param.num_output
        elif layer.type == "Input" and layer.input_param.shape:
            dims = layer.input_param.shape[0].dim
            out = dims[1] if len(dims) > 1 else None
        elif layer.type == "Concat" and None not in inputs and inputs:
            out = sum(inputs)  # type: ignore[arg-type]
        elif inputs and layer.type in _CHANNEL_WISE:
            out = next((c for c in inputs if c is not None), None)
        else:
            out = None
        for top in layer.top:
            channels[top] = out


@dataclass
class Recipe:
    """A parsed recipe with its data sources resolved; the messages are Caffe's protobufs."""

    folder: Path
    solver: Any  # caffe_pb2.SolverParameter, `net` still as written
    train_val: Any  # caffe_pb2.NetParameter, sources absolute
    deploy: Any  # caffe_pb2.NetParameter
    data_root: Path
    stand_in: str | None = None  # the stand-in dataset read instead of the recipe's own, if any
    builds: bool = False  # set once Caffe has been seen to build these nets

    @property
    def name(self) -> str:
        return self.folder.name

    @classmethod
    def load(
        cls,
        folder: Path,
        data_root: Path | None = None,
        allow_python_layers: bool = False,
        stand_in: bool = False,
    ) -> Recipe:
        folder = Path(folder).resolve()
        if not folder.is_dir():
            raise CaffeEvoError(f"{folder}: recipe folder not found")
        pb2 = caffe_pb2()
        solver = parse_prototxt(folder / SOLVER_FILE, pb2.SolverParameter())
        if not solver.net:
            raise CaffeEvoError(
                f"{folder / SOLVER_FILE}: the solver names no `net` (train_net/test_net unsupported)"
            )
        net_path = folder / solver.net
        train_val = parse_prototxt(net_path, pb2.NetParameter())
        deploy = parse_prototxt(folder / DEPLOY_FILE, pb2.NetParameter())
        for net, origin in ((train_val, net_path), (deploy, folder / DEPLOY_FILE)):
            check_python_layers(net, origin, allow_python_layers)
            check_layers(net, origin)
        data_root = Path(data_root).resolve() if data_root is not None else default_data_root()
        stand_in_name = None
        if stand_in:
            dataset, stand_in_name = read_stand_in(folder)
            use_stand_in(train_val, dataset, stand_in_name)
        resolve_sources(train_val, data_root, folder.name)
        if len(solver.test_iter) != len(solver.test_state):
            counts = f"{len(solver.test_iter)} test_iter for {len(solver.test_state)} test_state"
            raise CaffeEvoError(f"{folder / SOLVER_FILE}: {counts}")
        return cls(
            folder=folder,
            solver=solver,
            train_val=train_val,
            deploy=deploy,
            data_root=data_root,
            stand_in=stand_in_name,
        )

    @property
    def snapshot_name(self) -> str:
        """File-name stem of Caffe's snapshots (the last part of ``snapshot_prefix``)."""
        return Path(self.solver.snapshot_prefix or "snapshot").name

    def test_net_names(self) -> list[str]:
        """Names of the solver's test nets: their first stage, else ``test<i>``."""
        return [
            state.stage[0] if state.stage else f"test{i}" for i, state in enumerate(self.solver.test_state)
        ]

    def write_resolved(self, dest: Path, final_dest: Path | None = None, **solver_overrides: Any) -> Path:
        """Write solver, train_val and deploy prototxts with absolute paths into ``dest``.

        ``final_dest`` is where ``dest`` will end up (after an atomic rename); the solver's ``net`` and
        ``snapshot_prefix`` point there. Returns the solver's path inside ``dest``.
        """
        final_dest = Path(final_dest or dest).resolve()
        solver = type(self.solver)()
        solver.CopyFrom(self.solver)
        solver.net = str(final_dest / TRAIN_VAL_FILE)
        solver.snapshot_prefix = str(final_dest / self.snapshot_name)
        set_solver_fields(solver, solver_overrides)
        (dest / TRAIN_VAL_FILE).write_text(to_prototxt(self.train_val))
        (dest / DEPLOY_FILE).write_text(to_prototxt(self.deploy))
        solver_path = dest / SOLVER_FILE
        solver_path.write_text(to_prototxt(solver))
        return solver_path


def set_solver_fields(solver: Any, overrides: dict[str, Any]) -> None:
    """Set scalar SolverParameter fields by name, with one clear error for an unknown field or value."""
    if not isinstance(overrides, dict):
        raise CaffeEvoError(f"solver overrides must map SolverParameter fields to values, got {overrides!r}")
    for key, value in overrides.items():
        try:
            setattr(solver, key, value)
        except (AttributeError, TypeError, ValueError) as exc:
            raise CaffeEvoError(f"solver option {key}: {value!r} is not valid ({exc})") from None
