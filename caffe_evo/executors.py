"""Where a generation's candidates train: local worker processes, or tasks on a Ray cluster.

A task is small and picklable (a run folder and the candidate's coordinates); the worker reads all it
needs from the lineage on disk and writes its candidate folder atomically, so the lineage does not depend
on which worker trained what, nor on how many there are. Each worker loads the run once (its own Recipe,
so its own ``Recipe.builds`` probe): no mutable state is shared between processes. One writer per
candidate at a time: a task is retried only once the worker that ran it is dead (every worker of a broken
local pool is killed, and its exit seen, before a fresh pool starts; Ray retries a task only after its
worker process has died), so a retry never shares a ``.partial-`` folder with a live writer. Local
workers die with the driver (``PR_SET_PDEATHSIG``), so a killed driver leaves no orphan training a
candidate that a resumed run trains again.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import connection, get_context
from typing import Any, Protocol, TypeVar

from caffe_evo.errors import CaffeEvoError

KINDS = ("local", "ray")
RETRIES = 1  # re-runs of a task whose worker died (OOM, kill -9) before the run stops

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    return os.cpu_count() or 1


@dataclass(frozen=True)
class ExecutorOptions:
    """How candidates are dispatched; not part of the lineage, so a resumed run may change them."""

    kind: str = "local"
    workers: int | None = None  # local: processes (None = the machine's cores); ray: local instance CPUs
    ray_address: str | None = None  # ray: an existing cluster ("HOST:PORT" or "auto"); None = start one

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise CaffeEvoError(f"unknown --executor {self.kind!r}; choose from {', '.join(KINDS)}")
        if self.workers is not None and self.workers < 1:
            raise CaffeEvoError(f"--workers must be at least 1, got {self.workers}")
        if self.ray_address is not None and self.kind != "ray":
            raise CaffeEvoError("--ray-address needs --executor ray")

    @staticmethod
    def worker_env() -> dict[str, str]:
        """One BLAS thread per worker, unless ``$OPENBLAS_NUM_THREADS`` says otherwise."""
        return {"OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1")}


class Executor(Protocol):
    def map(
        self,
        fn: Callable[[T], R],
        tasks: Sequence[T],
        on_change: Callable[[list[T], int], None] | None = None,
    ) -> list[R]:
        """``fn`` over ``tasks``, results in task order; ``on_change(running, done)`` as tasks move."""
        ...

    def close(self) -> None: ...


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when the process that started it exits."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _init_worker(env: dict[str, str]) -> None:
    # BLAS reads its thread count when pycaffe first loads it, which is after this.
    os.environ.update(env)
    _die_with_parent()


class LocalExecutor:
    """A pool of ``workers`` processes, each with its own pycaffe (started by spawn, never forked)."""

    def __init__(self, workers: int, env: dict[str, str]) -> None:
        self.workers = workers
        self.env = env
        self._pool: ProcessPoolExecutor | None = None

    def _start(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(self.env,)
            )
        return self._pool

    def map(
        self,
        fn: Callable[[T], R],
        tasks: Sequence[T],
        on_change: Callable[[list[T], int], None] | None = None,
    ) -> list[R]:
        results: dict[int, R] = {}
        deaths = [0] * len(tasks)
        waiting = list(range(len(tasks)))
        running: dict[Future, int] = {}
        while waiting or running:
            pool = self._start()
            broken = False
            # Never more tasks in flight than workers, so "running" is what the workers train now.
            while waiting and len(running) < self.workers:
                try:
                    future = pool.submit(fn, tasks[waiting[0]])
                except BrokenProcessPool:  # a worker died while idle: no task was lost with it
                    broken = True
                    break
                running[future] = waiting.pop(0)
            if not broken:  # then at least one task is in flight
                if on_change is not None:
                    on_change([tasks[i] for i in running.values()], len(results))
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    index = running.pop(future)
                    try:
                        results[index] = future.result()
                    except BrokenProcessPool:
                        broken = True
                        deaths[index] += 1
                        waiting.insert(0, index)
            if broken:
                # Every task still in flight lost its worker too and runs again, in a fresh pool.
                for index in running.values():
                    deaths[index] += 1
                    waiting.insert(0, index)
                running.clear()
                self._discard()
                waiting.sort()
                dead = [tasks[i] for i in waiting if deaths[i] > RETRIES]
                if dead:
                    raise CaffeEvoError(
                        f"a worker process died (killed or out of memory) while running {dead[0]}, "
                        f"{RETRIES + 1} times; what completed is kept on disk (--resume continues)"
                    )
        if on_change is not None:
            on_change([], len(results))
        return [results[i] for i in range(len(tasks))]

    def _discard(self) -> None:
        """Forget a broken pool once every one of its workers has exited, so that no retry shares a
        candidate with a live writer. The pool stops its workers itself, with SIGTERM, and its shutdown
        then joins them and its queues' threads without bound; the guarantee rests here on SIGKILL, which
        no worker can catch or delay, and on each worker's exit seen on its sentinel."""
        pool, self._pool = self._pool, None
        assert pool is not None
        workers = list(pool._processes.values())  # the pool offers no public handle on its processes
        for process in workers:
            process.kill()
        connection.wait([process.sentinel for process in workers])
        pool.shutdown(wait=True, cancel_futures=True)  # its threads have nothing left to wait for

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _check_reachable(address: str) -> None:
    """Fail fast on a HOST:PORT nobody listens on; Ray itself would retry for a long time."""
    host, _, port = address.rpartition(":")
    host = host.removeprefix("ray://")
    if not host or not port.isdigit():
        raise CaffeEvoError(f"--ray-address {address}: expected HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise CaffeEvoError(f"--ray-address {address}: no Ray head reachable there ({exc})") from None


def _ray_call(env: dict[str, str], fn: Callable[[Any], Any], task: Any) -> Any:
    os.environ.update(env)
    return fn(task)


class RayExecutor:
    """Tasks on a Ray cluster (one CPU each); a local instance when no address is given.

    Workers must see the run folder at the same path (one machine, or a shared file system).
    """

    def __init__(self, address: str | None, workers: int | None, env: dict[str, str]) -> None:
        try:
            import ray
        except ImportError:
            raise CaffeEvoError("--executor ray needs the ray package (pip install ray)") from None
        if address is not None and address != "auto":
            _check_reachable(address)
        self.ray = ray
        self.env = env
        self._started = not ray.is_initialized()
        if self._started:
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address is None:
                options["num_cpus"] = workers or default_workers()
            else:
                options["address"] = address
            try:
                ray.init(**options)
            except (ConnectionError, RuntimeError, ValueError, OSError) as exc:
                raise CaffeEvoError(f"{_ray_target(address)} ({exc})") from None
        self._remote = ray.remote(num_cpus=1, max_retries=RETRIES, retry_exceptions=False)(_ray_call)

    def map(
        self,
        fn: Callable[[T], R],
        tasks: Sequence[T],
        on_change: Callable[[list[T], int], None] | None = None,
    ) -> list[R]:
        ray = self.ray
        refs = [self._remote.remote(self.env, fn, task) for task in tasks]
        index = {ref: i for i, ref in enumerate(refs)}
        pending = list(refs)
        done = 0
        while pending:
            if on_change is not None:  # Ray schedules them as CPUs free up; all are shown as submitted
                on_change([tasks[index[ref]] for ref in pending], done)
            finished, pending = ray.wait(pending, num_returns=1)
            done += len(finished)
        if on_change is not None:
            on_change([], done)
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, CaffeEvoError):  # bad input found by the worker: its one line
                raise exc.cause from None
            raise
        except ray.exceptions.RayError as exc:
            raise CaffeEvoError(
                f"a Ray worker died while running a candidate, {RETRIES + 1} times ({type(exc).__name__}); "
                "what completed is kept on disk (--resume continues)"
            ) from None

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()


def _ray_target(address: str | None) -> str:
    """What ``ray.init`` failed to do: without an address it joins $RAY_ADDRESS if set, else starts one."""
    if address is not None:
        return f"--ray-address {address}: cannot join the Ray cluster"
    if "RAY_ADDRESS" in os.environ:
        return f"RAY_ADDRESS={os.environ['RAY_ADDRESS']}: cannot join the Ray cluster"
    return "--executor ray: cannot start a local Ray instance"


def make(options: ExecutorOptions) -> Executor:
    options.validate()
    if options.kind == "ray":
        return RayExecutor(options.ray_address, options.workers, options.worker_env())
    return LocalExecutor(options.workers or default_workers(), options.worker_env())
