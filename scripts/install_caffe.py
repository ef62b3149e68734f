#!/usr/bin/env python3
"""Build BVLC Caffe (CPU, pycaffe, Python layers, LMDB, HDF5) into a cache and link it into a venv.

Source: the PyPI sdist ``brocolli-caffe==9.0.2`` (BVLC master 9b89154 plus SSD layers), built with its
classic Makefile against Debian 12's libraries and a Makefile.config written here. The build lands in
``<cache>/caffe/<key>/`` where the key names the source version, the options and the Python/numpy ABI,
so a change of any of them builds anew and an unchanged one is skipped. A ``.pth`` file in the venv
makes ``import caffe`` work; ``_caffe.so`` and ``caffe.bin`` find ``libcaffe.so`` through their rpath.

Runs with the standard library only, under the venv's interpreter (its numpy headers are compiled in).

    python scripts/install_caffe.py [--cache DIR] [--cuda] [--check] [--jobs N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

SDIST_NAME = "brocolli-caffe"
SDIST_VERSION = "9.0.2"
SDIST_SHA256 = "c6410cc60bdd6db685d441b66be7df05410f8850ac88d6b75d48ef9b2315c08a"
COMPLETE_MARKER = "caffe-evo-build.json"

APT_PACKAGES = [
    "build-essential",
    "libboost-system-dev",
    "libboost-thread-dev",
    "libboost-filesystem-dev",
    "libboost-regex-dev",
    "libboost-python-dev",
    "libgoogle-glog-dev",
    "libgflags-dev",
    "libprotobuf-dev",
    "protobuf-compiler",
    "libhdf5-dev",
    "libleveldb-dev",
    "libsnappy-dev",
    "liblmdb-dev",
    "libopenblas-dev",
]


class InstallError(RuntimeError):
    """A step of the installation failed; the message says which and why."""


def build_options(cuda: bool) -> dict[str, str]:
    """The options that decide the binary; they are part of the cache key."""
    import numpy

    return {
        "source": f"{SDIST_NAME}=={SDIST_VERSION}",
        "device": "cuda" if cuda else "cpu",
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "numpy": numpy.__version__,
        "opencv": "0",
        "lmdb": "1",
        "hdf5": "1",
        "python_layer": "1",
        "blas": "openblas",
    }


def cache_key(options: dict[str, str]) -> str:
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]
    return f"{SDIST_VERSION}-{options['device']}-py{options['python']}-{digest}"


def build_dir(cache: Path, options: dict[str, str]) -> Path:
    return cache / "caffe" / cache_key(options)


def is_complete(prefix: Path, options: dict[str, str]) -> bool:
    """True when a previous build under ``prefix`` finished with exactly these options."""
    marker = prefix / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if recorded.get("options") != options:
        return False
    return all((prefix / rel).exists() for rel in recorded.get("artifacts", []))


def run(cmd: list[str], step: str, cwd: Path | None = None, log: Path | None = None) -> None:
    """Run one step; on failure raise with the step's name and the tail of its output."""
    if log is None:
        result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        output = result.stdout + result.stderr
    else:
        with log.open("w") as fh:
            result = subprocess.run(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, text=True)
        output = log.read_text(errors="replace")
    if result.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-15:])
        where = f" (full log: {log})" if log else ""
        raise InstallError(f"{step} failed with exit code {result.returncode}{where}:\n{tail}")


def install_apt_packages() -> None:
    missing = [
        pkg
        for pkg in APT_PACKAGES
        if subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True
        ).stdout.strip()
        != "install ok installed"
    ]
    if not missing:
        return
    if os.geteuid() != 0:
        raise InstallError("Debian packages missing and not root: apt-get install " + " ".join(missing))
    print(f"[caffe] apt-get install {' '.join(missing)}", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
    result = subprocess.run(
        ["apt-get", "install", "-y", "-qq", *missing], env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise InstallError("apt-get install failed: " + result.stderr.strip().splitlines()[-1])


def fetch_sdist(dest: Path) -> Path:
    """Download the sdist with pip and check its SHA-256."""
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-q",
            "-d",
            str(dest),
            f"{SDIST_NAME}=={SDIST_VERSION}",
        ],
        "pip download of the Caffe source",
    )
    tarball = dest / f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
    if not tarball.is_file():
        raise InstallError(f"pip download did not produce {tarball.name}")
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise InstallError(f"{tarball.name}: SHA-256 {digest} is not the expected {SDIST_SHA256}")
    return tarball


def makefile_config(cuda: bool) -> str:
    import numpy

    include = sysconfig.get_paths()["include"]
    libdir = sysconfig.get_config_var("LIBDIR")
    pyver = f"{sys.version_info.major}{sys.version_info.minor}"
    lines = [
        "# Written by caffe-evo's scripts/install_caffe.py",
        "CPU_ONLY := 0" if cuda else "CPU_ONLY := 1",
        "USE_OPENCV := 0",
        "USE_LEVELDB := 0",
        "USE_LMDB := 1",
        "USE_HDF5 := 1",
        "WITH_PYTHON_LAYER := 1",
        "BLAS := open",
        "BLAS_INCLUDE := /usr/include/x86_64-linux-gnu/openblas-pthread",
        f"PYTHON_LIBRARIES := boost_python{pyver} python{sys.version_info.major}.{sys.version_info.minor}",
        f"PYTHON_INCLUDE := {include} {numpy.get_include()}",
        f"PYTHON_LIB := {libdir}",
        "INCLUDE_DIRS := $(PYTHON_INCLUDE) /usr/local/include /usr/include/hdf5/serial",
        "LIBRARY_DIRS := $(PYTHON_LIB) /usr/local/lib /usr/lib /usr/lib/x86_64-linux-gnu/hdf5/serial",
        "CUSTOM_CXX := g++ -std=c++14",
        "Q ?= @",
    ]
    if cuda:
        lines += ["CUDA_DIR := /usr/local/cuda", "CUDA_ARCH := -gencode arch=compute_61,code=sm_61"]
    return "\n".join(lines) + "\n"


def build(prefix: Path, options: dict[str, str], cuda: bool, jobs: int) -> None:
    """Unpack, configure and build into a sibling temp dir, then rename into place."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix.name + ".partial-", dir=prefix.parent))
    try:
        tarball = fetch_sdist(work)
        # The tarball's SHA-256 is pinned above, so its member paths are trusted.
        with tarfile.open(tarball) as tar:
            tar.extractall(work)
        src = work / f"{SDIST_NAME}-{SDIST_VERSION}"
        (src / "Makefile.config").write_text(makefile_config(cuda))
        # The sdist ships a caffe_pb2.py from an old protoc that protobuf 4.x refuses ("duplicate file
        # name caffe/proto/caffe.proto"); removing it makes the Makefile regenerate it with Debian's protoc.
        (src / "python" / "caffe" / "proto" / "caffe_pb2.py").unlink()
        log = prefix.parent / f"{prefix.name}.build.log"
        print(f"[caffe] make -j{jobs} all pycaffe (about 6 minutes on 2 cores; log: {log})", flush=True)
        run(["make", f"-j{jobs}", "all", "pycaffe"], "Caffe build (make all pycaffe)", cwd=src, log=log)
        # _caffe.so carries rpath $ORIGIN/../../build/lib; the Makefile names its build dir .temp_release.
        (src / "build").symlink_to(".temp_release")
        artifacts = [
            "build/lib/libcaffe.so.1.0.0-rc3",
            "build/tools/caffe.bin",
            "python/caffe/_caffe.so",
            "python/caffe/proto/caffe_pb2.py",
        ]
        missing = [a for a in artifacts if not (src / a).exists()]
        if missing:
            raise InstallError(f"Caffe build finished without {', '.join(missing)}")
        tarball.unlink()
        for leftover in (src / ".temp_release").rglob("*.o"):
            leftover.unlink()
        marker = {"options": options, "artifacts": artifacts}
        (src / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if prefix.exists():
            shutil.rmtree(prefix)
        src.rename(prefix)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def link_into_venv(prefix: Path) -> Path:
    """Put pycaffe on the venv's path and `caffe` next to its python."""
    site = Path(sysconfig.get_paths()["purelib"])
    pth = site / "caffe_evo_pycaffe.pth"
    pth.write_text(str(prefix / "python") + "\n")
    scripts = Path(sysconfig.get_paths()["scripts"])
    caffe_bin = scripts / "caffe"
    if caffe_bin.is_symlink() or caffe_bin.exists():
        caffe_bin.unlink()
    caffe_bin.symlink_to(prefix / "build" / "tools" / "caffe.bin")
    return pth


def check_import() -> str:
    probe = "import caffe; caffe.set_mode_cpu(); print(caffe.__version__)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise InstallError(f"pycaffe does not import after installation: {last}")
    return result.stdout.strip()


def default_cache() -> Path:
    return Path(os.environ.get("CAFFE_EVO_CACHE", Path.home() / ".cache" / "caffe-evo"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=default_cache(), help="cache root")
    parser.add_argument("--cuda", action="store_true", help="CUDA build (needs the CUDA toolkit)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--check", action="store_true", help="exit 0 if the cache is complete, 1 if not")
    parser.add_argument("--print-prefix", action="store_true", help="print the build directory and exit")
    args = parser.parse_args(argv)

    options = build_options(args.cuda)
    prefix = build_dir(args.cache, options)
    if args.print_prefix:
        print(prefix)
        return 0
    if args.check:
        complete = is_complete(prefix, options)
        print(f"{prefix}: {'complete' if complete else 'missing or incomplete'}")
        return 0 if complete else 1
    try:
        if is_complete(prefix, options):
            print(f"[caffe] cached build is complete: {prefix}")
        else:
            install_apt_packages()
            build(prefix, options, args.cuda, args.jobs)
        link_into_venv(prefix)
        version = check_import()
    except InstallError as exc:
        print(f"install_caffe: {exc}", file=sys.stderr)
        return 1
    print(f"[caffe] pycaffe {version} ready from {prefix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
