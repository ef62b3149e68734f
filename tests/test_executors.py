"""Candidates trained by local worker processes and by Ray: the same lineage bit for bit, workers that die,
a driver killed mid-generation, bad executor options. Real pycaffe, real MNIST, a local Ray instance."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import short_eval_recipe

from caffe_evo import atomic
from caffe_evo.errors import CaffeEvoError
from caffe_evo.evolution import EvolutionConfig, resume, start
from caffe_evo.executors import ExecutorOptions, LocalExecutor, make
from caffe_evo.recipe import Recipe
from caffe_evo.training import TrainOptions, train


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LeNet-5 evaluated on 500 validation and 500 test images."""
    return short_eval_recipe(tmp_path_factory.mktemp("recipes") / "lenet5-tiny")


@pytest.fixture(scope="module")
def config_json(tiny_recipe: Path, data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 2-generation run of 2 candidates from one ancestor trained once here."""
    ancestor = tmp_path_factory.mktemp("ancestor") / "trained"
    train(Recipe.load(tiny_recipe, data_root), ancestor, TrainOptions(max_iter=60, seed=5, progress=False))
    return EvolutionConfig(
        recipe=str(tiny_recipe),
        data_root=str(data_root),
        ancestor=str(ancestor),
        generations=2,
        population=2,
        seed=11,
        iters_per_generation=20,
        max_accuracy_drop=1.0,
        measure=False,
    ).to_json()


def fingerprint(run: Path) -> dict[str, str]:
    """md5 of every mask and caffemodel in the lineage (candidates included), by relative path."""
    files = sorted(p for p in run.rglob("*") if p.name in ("masks.npz", "weights.caffemodel"))
    assert len(files) == 2 * (3 + 2 * 2)  # gen_000..gen_002 and 2 generations x 2 candidates, 2 files each
    return {str(p.relative_to(run)): hashlib.md5(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def one_worker(config_json: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("w1") / "run"
    config = EvolutionConfig.from_json(config_json)
    start(config, run, progress=False, executor=ExecutorOptions(workers=1)).run()
    return run


def test_two_workers_and_ray_give_the_same_lineage(
    one_worker: Path, config_json: dict, tmp_path: Path
) -> None:
    reference = fingerprint(one_worker)
    for name, options in (("w2", ExecutorOptions(workers=2)), ("ray", ExecutorOptions("ray", workers=2))):
        run = tmp_path / name
        start(EvolutionConfig.from_json(config_json), run, progress=False, executor=options).run()
        assert fingerprint(run) == reference, name
        candidate = json.loads((run / "candidates" / "gen_002" / "a0_c1" / "metrics.json").read_text())
        assert candidate["parents"] == ["gen_001"]


def _cli(config_json: dict, run: Path, tmp_path: Path, *options: str) -> subprocess.Popen:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(config_json))
    command = [sys.executable, "-m", "caffe_evo.cli", "evolve", "--config", str(config), "--out", str(run)]
    return subprocess.Popen(
        [*command, "--no-progress", *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONFAULTHANDLER="1"),  # a hung driver shows its threads' stacks on SIGABRT
    )


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """The driver's stderr once it exits; a driver that hangs is aborted and the test shows where."""
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        stacks = proc.communicate()[1]
        pytest.fail(f"the driver hung for {timeout} s; its threads, as it was aborted:\n{stacks}")


def _workers(pid: int) -> list[int]:
    """The pool's worker processes among the children of ``pid`` (not multiprocessing's resource tracker)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(int(child))
    return found


def _when_training(proc: subprocess.Popen, folder: Path) -> None:
    """Wait until a candidate of ``folder`` is being written (a worker is inside its training)."""
    deadline = time.monotonic() + 300  # generous: the machine may be busy
    while not list(folder.glob(".a0_c*.partial-*")):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
        time.sleep(0.05)
    time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_killed_worker_is_retried(one_worker: Path, config_json: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _cli(config_json, run, tmp_path, "--workers", "2")
    _when_training(proc, run / "candidates" / "gen_002")
    victims = _workers(proc.pid)
    assert len(victims) == 2
    os.kill(victims[0], signal.SIGKILL)
    err = _finish(proc)
    assert proc.returncode == 0, err
    assert fingerprint(run) == fingerprint(one_worker)
    assert not list(run.rglob("*.partial-*"))


def test_killed_driver_takes_its_workers_along_and_resumes(
    one_worker: Path, config_json: dict, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    proc = _cli(config_json, run, tmp_path, "--workers", "2")
    _when_training(proc, run / "candidates" / "gen_001")
    workers = _workers(proc.pid)
    assert workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in workers):  # no orphan keeps writing the candidate
        assert time.monotonic() < deadline, "a worker outlived its driver"
        time.sleep(0.1)
    assert not (run / "gen_001").exists()
    resume(run, progress=False, executor=ExecutorOptions(workers=1)).run()  # other options: allowed
    assert fingerprint(run) == fingerprint(one_worker)
    assert not list(run.rglob("*.partial-*"))


def test_a_second_driver_is_refused(one_worker: Path, tmp_path: Path) -> None:
    """Two drivers on one run folder would delete each other's partial writes: while one holds the run, a
    second is refused with one line and changes nothing. (That the hold ends with a killed driver is
    test_killed_driver_takes_its_workers_along_and_resumes: its resume takes the same lock.)"""
    run = tmp_path / "run"
    shutil.copytree(one_worker, run)
    before = fingerprint(run)
    with atomic.exclusive(run, "the run"):
        second = subprocess.run(
            [sys.executable, "-m", "caffe_evo.cli", "evolve", "--resume", str(run), "--no-progress"],
            capture_output=True,
            text=True,
        )
    in_use = f"the run is in use by another process (pid {os.getpid()}); wait for it or stop it first"
    assert (second.returncode, second.stderr, second.stdout) == (2, f"caffe-evo: {run}: {in_use}\n", "")
    assert fingerprint(run) == before


def _die_once(marker: str) -> int:
    """Kill this worker the first time, as the OOM killer would; succeed when retried."""
    if not Path(marker).exists():
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


def _die(_: int) -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    return 0


def test_a_worker_that_keeps_dying_fails_cleanly(tmp_path: Path) -> None:
    pool = LocalExecutor(2, {"OPENBLAS_NUM_THREADS": "1"})
    try:
        assert pool.map(_die_once, [str(tmp_path / "marker")])[0] > 0  # retried in a fresh worker
        started = time.monotonic()
        with pytest.raises(CaffeEvoError, match="worker process died .* 2 times; what completed is kept"):
            pool.map(_die, [1, 2])
        assert time.monotonic() - started < 60  # never a hang
        assert pool.map(abs, [-3]) == [3]  # the executor stays usable
    finally:
        pool.close()


def _pid(_: int) -> int:
    return os.getpid()


def test_a_worker_that_dies_while_idle_is_replaced(tmp_path: Path) -> None:
    """The OOM killer may pick a worker between two generations: the next map starts a fresh pool, and
    no task is counted as lost (a task that then dies once is still retried)."""
    pool = LocalExecutor(2, {"OPENBLAS_NUM_THREADS": "1"})
    try:
        idle = pool.map(_pid, [0])[0]
        os.kill(idle, signal.SIGKILL)  # the pool breaks and stops its other worker
        deadline = time.monotonic() + 20
        while _alive(idle):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert pool.map(_die_once, [str(tmp_path / "marker")])[0] > 0
        assert pool.map(abs, [-3, -4]) == [3, 4]
    finally:
        pool.close()


def test_bad_executor_options(tmp_path: Path) -> None:
    with pytest.raises(CaffeEvoError, match="--workers must be at least 1, got 0"):
        make(ExecutorOptions(workers=0))
    with pytest.raises(CaffeEvoError, match="--ray-address needs --executor ray"):
        make(ExecutorOptions(ray_address="127.0.0.1:1"))
    with pytest.raises(CaffeEvoError, match="unknown --executor 'slurm'"):
        make(ExecutorOptions("slurm"))
    started = time.monotonic()
    with pytest.raises(CaffeEvoError, match=r"--ray-address 127\.0\.0\.1:9: no Ray head reachable"):
        make(ExecutorOptions("ray", ray_address="127.0.0.1:9"))
    assert time.monotonic() - started < 10


def test_ray_retries_a_dead_worker_then_fails_cleanly(tmp_path: Path) -> None:
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests/
    pool = make(ExecutorOptions("ray", workers=1))
    try:
        assert pool.map(_die_once, [str(tmp_path / "marker")])[0] > 0  # Ray ran it again
        with pytest.raises(CaffeEvoError, match="a Ray worker died while running a candidate, 2 times"):
            pool.map(_die, [1])
    finally:
        pool.close()


def test_ray_without_an_address_says_what_failed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No --ray-address: Ray starts a local instance, or joins $RAY_ADDRESS when that is set."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "file" / "ray"))  # no folder can be made there
    (tmp_path / "file").write_text("")
    with pytest.raises(
        CaffeEvoError, match=r"^--executor ray: cannot start a local Ray instance \(.*Not a dir"
    ):
        make(ExecutorOptions("ray", workers=1))
    monkeypatch.setenv("RAY_ADDRESS", "nonsense")
    with pytest.raises(CaffeEvoError, match=r"^RAY_ADDRESS=nonsense: cannot join the Ray cluster \(Invalid"):
        make(ExecutorOptions("ray", workers=1))
