"""Atomic writes: an output either exists complete or not at all.

Files and directories are written beside their final path under a ``.partial-`` name and renamed into
place only when complete; a crash or ``kill -9`` leaves at most a ``.partial-`` leftover, which the next
run ignores and removes. Leftovers are removed by whoever writes the same name next, so a folder written to
by one driver at a time is held under :func:`exclusive`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from caffe_evo.errors import CaffeEvoError

PARTIAL_MARK = ".partial-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` to disk: once renamed complete, it stays complete."""
    for path in sorted(folder.rglob("*"), reverse=True):  # contents before their folders
        if path.is_symlink():
            continue
        if path.is_dir():
            _fsync_dir(path)
        else:
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def check_space(folder: Path, needed: int) -> None:
    """Refuse to go on when ``folder``'s file system has fewer than ``needed`` bytes free, or is not writable.

    For writers that cannot fail cleanly (Caffe's own abort the process on an I/O error).
    """
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise CaffeEvoError(f"{folder}: {free:,} bytes free, {needed:,} needed; free some disk space")
    if not os.access(folder, os.W_OK):
        raise CaffeEvoError(f"{folder}: not writable")


def remove_partials(parent: Path, name: str) -> None:
    """Delete leftovers of interrupted atomic writes of ``parent/name``."""
    if not parent.is_dir():
        return
    for leftover in parent.glob(f".{name}{PARTIAL_MARK}*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


LOCK_FILE = ".lock"


@contextlib.contextmanager
def exclusive(folder: Path, what: str) -> Iterator[None]:
    """Hold ``folder`` for this process: a second holder is refused with a clear error, not let in to
    delete the first one's partial writes. The lock is the kernel's (flock), so it ends with the process,
    ``kill -9`` included, and a resume after a crash finds the folder free."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise CaffeEvoError(
                f"{folder}: {what} is in use by another process (pid {holder}); wait for it or stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def atomic_path(final: Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it onto ``final``, on error delete it.

    An existing ``final`` is replaced only after the new content is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_partials(final.parent, final.name)
    prefix = f".{final.name}{PARTIAL_MARK}"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if directory:
            _fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
        else:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
