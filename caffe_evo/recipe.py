"""Recipes: a folder of Caffe's own files (``solver.prototxt``, its net, ``deploy.prototxt``).

A recipe stays plain Caffe so that any Caffe tool reads it. Two path rules make it relocatable:
the solver's ``net`` is relative to the recipe folder, and a relative ``data_param.source`` is relative
to the data root (``--data-root``, else ``$CAFFE_EVO_DATA``, else ``./data``). :meth:`Recipe.write_resolved`
writes a copy with absolute paths that the ``caffe`` binary runs from any directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from caffe_evo.caffe_env import caffe_pb2
from caffe_evo.errors import CaffeEvoError

SOLVER_FILE = "solver.prototxt"
DEPLOY_FILE = "deploy.prototxt"
TRAIN_VAL_FILE = "train_val.prototxt"

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


def resolve_sources(net: Any, data_root: Path, recipe_name: str) -> None:
    """Make every data layer's ``source`` absolute and check that it exists."""
    for layer in net.layer:
        field = _SOURCE_PARAMS.get(layer.type)
        if field is None:
            continue
        param = getattr(layer, field)
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


@dataclass
class Recipe:
    """A parsed recipe with its data sources resolved; the messages are Caffe's protobufs."""

    folder: Path
    solver: Any  # caffe_pb2.SolverParameter, `net` still as written
    train_val: Any  # caffe_pb2.NetParameter, sources absolute
    deploy: Any  # caffe_pb2.NetParameter
    data_root: Path
    builds: bool = False  # set once Caffe has been seen to build these nets

    @property
    def name(self) -> str:
        return self.folder.name

    @classmethod
    def load(cls, folder: Path, data_root: Path | None = None, allow_python_layers: bool = False) -> Recipe:
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
        data_root = Path(data_root).resolve() if data_root is not None else default_data_root()
        resolve_sources(train_val, data_root, folder.name)
        if len(solver.test_iter) != len(solver.test_state):
            counts = f"{len(solver.test_iter)} test_iter for {len(solver.test_state)} test_state"
            raise CaffeEvoError(f"{folder / SOLVER_FILE}: {counts}")
        return cls(folder=folder, solver=solver, train_val=train_val, deploy=deploy, data_root=data_root)

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
