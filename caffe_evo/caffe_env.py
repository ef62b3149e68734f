"""The single place that imports pycaffe, so that glog's verbosity is set before Caffe starts.

glog reads ``GLOG_minloglevel`` once, when libcaffe is loaded: the level chosen by the first call to
:func:`load_caffe` in a process holds for the rest of that process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import weakref
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from caffe_evo.errors import CaffeEvoError

_QUIET_LEVEL = "2"  # errors only: hides Caffe's per-layer set-up chatter and solver logging
_VERBOSE_LEVEL = "0"


def configure_logging(verbose: bool) -> None:
    """An explicit choice of glog's level (the CLI's ``--verbose``), over any inherited from the environment.

    It must come before pycaffe is loaded: glog reads the level once.
    """
    os.environ["GLOG_minloglevel"] = _VERBOSE_LEVEL if verbose else _QUIET_LEVEL  # noqa: SIM112 (glog spells it so)


def load_caffe(verbose: bool = False) -> ModuleType:
    """Import pycaffe in CPU mode; ``verbose`` keeps glog's INFO output unless a level was already chosen."""
    os.environ.setdefault("GLOG_minloglevel", _VERBOSE_LEVEL if verbose else _QUIET_LEVEL)
    try:
        import caffe
    except ImportError as exc:
        raise CaffeEvoError(
            f"pycaffe is not importable ({exc}); run `bash scripts/setup.sh` to build it"
        ) from None
    caffe.set_mode_cpu()
    return caffe


def caffe_pb2() -> ModuleType:
    """Caffe's generated protobuf module (``caffe.proto.caffe_pb2``)."""
    load_caffe()
    from caffe.proto import caffe_pb2 as pb2

    return pb2


_PROBE = """
import sys, caffe
caffe.set_mode_cpu()
for path, phase in zip(sys.argv[1::2], sys.argv[2::2]):
    caffe.Net(path, getattr(caffe, phase))
"""
_GLOG_FATAL = re.compile(r"^F\d{4,8} [^\]]*\] (.*)$")


def check_nets_build(nets: list[tuple[Path, str]], label: str) -> None:
    """Instantiate each ``(prototxt, "TRAIN"|"TEST")`` in a child process.

    Caffe answers a malformed net (unknown layer, impossible shapes) with a glog CHECK that aborts the
    process; probing in a child turns that into one error line naming the file.
    """
    args = [str(part) for path, phase in nets for part in (path, phase)]
    env = dict(os.environ, GLOG_minloglevel="2")
    result = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env=env)
    if result.returncode == 0:
        return
    lines = result.stderr.strip().splitlines()
    fatal = [m.group(1) for line in lines if (m := _GLOG_FATAL.match(line))]
    reason = fatal[0] if fatal else (lines[-1] if lines else f"exit code {result.returncode}")
    raise CaffeEvoError(f"Caffe cannot build the nets of {label}: {reason}")


class SolverCallback(Protocol):
    """Caffe's Solver::Callback: called before each iteration, and between backward pass and update."""

    def on_start(self) -> None: ...

    def on_gradients_ready(self) -> None: ...


def add_solver_callback(solver: Any, handler: SolverCallback) -> None:
    """Register ``handler`` with a pycaffe solver without keeping it alive.

    pycaffe never frees what ``add_callback`` receives, so a handler holding a net would keep that net,
    and its Data layers, alive for the whole process; this fork's DataReader then serves a later net
    reading the same LMDB layer nothing, and Caffe waits forever. Caffe therefore gets two small
    functions that hold only a weak reference; the caller keeps the handler for the training run.
    """
    ref = weakref.ref(handler)

    def on_start() -> None:
        if (alive := ref()) is not None:
            alive.on_start()

    def on_gradients_ready() -> None:
        if (alive := ref()) is not None:
            alive.on_gradients_ready()

    solver.add_callback(on_start, on_gradients_ready)
