"""The lock on OUTPUT: one job at a time, stale locks of dead jobs taken over, loss detected."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import fsspec
import pytest
import ray

from jobs.cli import main
from jobs.driver import run_job
from jobs.lease import LOCK_FILE, LockInfo, LostLockError, OutputLock
from tests.faults.helpers import check_exactly_once, manifest, read_files, read_parts, spec_for
from workers.errors import OutputConflictError

pytestmark = pytest.mark.faults


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def foreign_lock(path: Path, **fields: Any) -> LockInfo:
    """Write a lock as another job would have."""
    info = LockInfo(owner="f" * 32, host="other-host", pid=4242, pid_namespace="pid:[1]",
                    pid_start="1", started="2026-01-01T00:00:00+00:00", heartbeat=0.0,
                    timeout=120.0)
    info = LockInfo(**{**info.__dict__, **fields})
    path.mkdir(parents=True, exist_ok=True)
    (path / LOCK_FILE).write_bytes(info.to_bytes())
    return info


def test_second_lock_is_refused_naming_the_owner(tmp_path: Path) -> None:
    first = OutputLock(str(tmp_path / "out"), timeout=60)
    first.acquire()
    try:
        second = OutputLock(str(tmp_path / "out"), timeout=60)
        with pytest.raises(OutputConflictError, match=(
                rf"output '.*out' is locked by another job: job {first.me.owner[:12]} on host "
                rf"{socket.gethostname()} \(pid {first.me.pid}\), started .*, last heartbeat 0s "
                r"ago; wait for it to finish, or if it is dead, rerun after its lock goes stale "
                r"\(60s after its last heartbeat\), or pass --takeover")):
            second.acquire()
    finally:
        first.release()
    assert not (tmp_path / "out" / LOCK_FILE).exists()
    second.acquire()
    second.release()


# Only stores with an atomic create-if-absent: fsspec's memory filesystem checks then writes.
@pytest.mark.parametrize("where", ["local", "s3"])
def test_racing_jobs_get_one_lock(where: str, tmp_path: Path, request: pytest.FixtureRequest
                                  ) -> None:
    """Eight jobs racing for the lock: exactly one gets it (an exclusive create)."""
    url = f"{request.getfixturevalue('s3_bucket')}/out" if where == "s3" else str(tmp_path / "out")
    start = threading.Barrier(8)
    outcomes: list[str] = []

    def contend() -> OutputLock | None:
        lock = OutputLock(url, timeout=60)
        start.wait()
        try:
            lock.acquire()
        except OutputConflictError as exc:
            outcomes.append(str(exc))
            return None
        return lock

    with ThreadPoolExecutor(8) as pool:
        winners = [lock for lock in pool.map(lambda _: contend(), range(8)) if lock is not None]
    assert len(winners) == 1 and len(outcomes) == 7
    assert all("is locked by another job" in o for o in outcomes)
    winners[0].release()


def test_stale_lock_is_taken_over_and_the_old_owner_finds_out(tmp_path: Path) -> None:
    clock = Clock()
    old = OutputLock(str(tmp_path / "out"), timeout=60, clock=clock)
    old.acquire()
    try:
        clock.now += 61  # the old job stopped refreshing a minute ago
        new = OutputLock(str(tmp_path / "out"), timeout=60, clock=clock)
        new.acquire()
        assert new.took_over is not None
        assert new.took_over[0].owner == old.me.owner
        assert new.took_over[1] == "no heartbeat for 61s (this job's lock timeout is 60s)"
        assert new.to_json()["took_over"]["reason"].startswith("no heartbeat")
        with pytest.raises(LostLockError, match=r"this job lost its lock on output '.*out': it is "
                           rf"now held by job {new.me.owner[:12]}"):
            old.refresh()
    finally:
        old.release()  # must not remove the new owner's lock
    assert LockInfo.parse((tmp_path / "out" / LOCK_FILE).read_bytes()) == new.me
    new.release()


def test_lock_of_an_exited_process_is_taken_over_at_once(tmp_path: Path) -> None:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    me = LockInfo.mine(60, "", Clock())
    foreign_lock(tmp_path / "out", host=me.host, pid=int(child.stdout), heartbeat=Clock()(),
                 pid_namespace=me.pid_namespace, pid_start="")
    lock = OutputLock(str(tmp_path / "out"), timeout=60, clock=Clock())
    lock.acquire()
    assert lock.took_over is not None
    assert lock.took_over[1] == f"its process {int(child.stdout)} on this host has exited"
    lock.release()


def test_fresh_lock_of_another_host_is_kept_unless_takeover(tmp_path: Path) -> None:
    clock = Clock()
    foreign_lock(tmp_path / "out", heartbeat=clock.now - 5)
    with pytest.raises(OutputConflictError, match=r"job ffffffffffff on host other-host \(pid "
                       r"4242\), started 2026-01-01T00:00:00\+00:00, last heartbeat 5s ago"):
        OutputLock(str(tmp_path / "out"), clock=clock).acquire()
    lock = OutputLock(str(tmp_path / "out"), clock=clock)
    lock.acquire(takeover=True)
    assert lock.took_over is not None and lock.took_over[1] == "--takeover"
    lock.release()


def test_unreadable_lock_counts_as_held(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / LOCK_FILE).write_text("{not json")
    with pytest.raises(OutputConflictError, match=r"_lock.json' is malformed \(not a JSON object\)"):
        OutputLock(str(tmp_path / "out"), timeout=60).acquire()
    lock = OutputLock(str(tmp_path / "out"), timeout=60)
    lock.acquire(takeover=True)
    lock.release()


def test_heartbeat_notices_a_takeover(tmp_path: Path) -> None:
    lock = OutputLock(str(tmp_path / "out"), timeout=0.2)  # refreshes every 0.05 s
    lock.acquire()
    foreign_lock(tmp_path / "out", heartbeat=Clock()())
    assert lock._thread is not None
    lock._thread.join(10)  # the heartbeat thread ends when it finds the lock taken
    with pytest.raises(LostLockError, match=r"lost its lock .* now held by job ffffffffffff"):
        lock.check()
    lock.release()
    assert (tmp_path / "out" / LOCK_FILE).exists()  # the other job's lock stays


def test_heartbeat_moves_forward(tmp_path: Path) -> None:
    clock = Clock()
    lock = OutputLock(str(tmp_path / "out"), timeout=60, clock=clock)
    lock.acquire()
    clock.now += 30
    lock.refresh()
    assert LockInfo.parse((tmp_path / "out" / LOCK_FILE).read_bytes()).heartbeat == clock.now
    lock.release()


# -- jobs ---------------------------------------------------------------------------------------

@pytest.mark.ray
def test_second_job_refused_while_the_first_runs(controller: Any, two_input_onnx: Path,
                                                 dataset: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    ray.get(controller.arm.remote("pause", times=1))
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(run_job, spec_for(str(two_input_onnx), str(dataset), str(out)),
                            io.StringIO())
        ray.get(controller.wait_blocked.remote(120), timeout=150)  # the first job is mid-run
        code = main(["--model", str(two_input_onnx), "--input", str(dataset), "--output",
                     str(out), "--column", "image=img", "--column", "meta=features",
                     "--keep", "uid", "--keep", "name", "--backend", "onnxruntime"])
        ray.get(controller.release.remote())
        report = first.result(timeout=300)
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: output '{out}' is locked by another job: job " in err
    assert "or pass --takeover to take the lock now" in err
    assert report.exit_code == 0 and not (out / LOCK_FILE).exists()
    check_exactly_once(two_input_onnx.read_bytes(), read_files(sorted(map(str, dataset.iterdir()))),
                       read_parts(str(out)))


@pytest.mark.ray
def test_job_that_loses_its_lock_writes_no_manifest(controller: Any, two_input_onnx: Path,
                                                    dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    ray.get(controller.arm.remote("pause", times=1))
    spec = spec_for(str(two_input_onnx), str(dataset), str(out), lock_timeout=1.0)
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(run_job, spec, io.StringIO())
        ray.get(controller.wait_blocked.remote(120), timeout=150)
        foreign_lock(out, heartbeat=time.time() + 10_000)  # another job took OUTPUT over
        with pytest.raises(LostLockError, match="this job lost its lock on output"):
            job.result(timeout=300)
    assert not (out / "_manifest.json").exists() and not (out / "_SUCCESS").exists()
    assert json.loads((out / LOCK_FILE).read_text())["owner"] == "f" * 32


@pytest.mark.ray
def test_stale_lock_of_a_dead_job_is_taken_over(fault_ray: Any, two_input_onnx: Path,
                                                dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    foreign_lock(out, heartbeat=time.time() - 10_000)
    stream = io.StringIO()
    report = run_job(spec_for(str(two_input_onnx), str(dataset), str(out)), stream)
    assert report.exit_code == 0
    assert "lock: took over the lock on" in stream.getvalue()
    took = manifest(str(out))["lock"]["took_over"]
    assert took["owner"] == "f" * 32 and took["reason"].startswith("no heartbeat for")
    assert not fsspec.filesystem("file").exists(str(out / LOCK_FILE))
