"""The output lock: one job at a time writes an OUTPUT; a dead job's lock goes stale.

`OUTPUT/_lock.json` names its owner (a random id, host, pid, start time) and carries a heartbeat
that a thread of the driver refreshes every `timeout / 4` seconds. Another job refuses to start
while the lock is fresh, and takes it over when it is stale: no heartbeat for `timeout`
seconds, or the owner was a process on this host (same PID namespace) that no longer exists.

How strong this is depends on the store. The lock is created with fsspec's exclusive create
(`mode="create"`): O_EXCL on local disks, a conditional PUT (If-None-Match) on S3 and GCS, so
two jobs starting together cannot both create it. Taking over a stale lock is a delete and a
create; two jobs taking over the same stale lock at the same instant could both succeed, and
the heartbeat then finds out: a job whose heartbeat reads another owner stops before it writes
its manifest or `_SUCCESS` (`LostLockError`). Stores without conditional writes give only the
heartbeat check. Staleness compares heartbeat times across hosts: clocks must agree to well
within `timeout`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from workers.errors import OutputConflictError, StorageError
from workers.storage import (
    create_exclusive,
    filesystem,
    read_bytes,
    remove_file,
    write_bytes_atomic,
)

LOCK_FILE = "_lock.json"
log = logging.getLogger(__name__)


class LostLockError(OutputConflictError):
    """Another job took this job's lock on OUTPUT, or it could not be refreshed for too long."""


def _proc_stat(pid: int) -> list[str]:
    """Fields 3 and on of `/proc/PID/stat` (Linux); empty when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name (field 2) may hold spaces; fields after its ')' are fixed.
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _proc_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    fields = _proc_stat(pid)
    return fields[19] if len(fields) > 19 else ""


def _proc_exited(pid: int) -> bool:
    """True when the process is gone, or has exited and waits as a zombie (state Z or X) for a
    parent that may never reap it (PID 1 of a container that does not)."""
    fields = _proc_stat(pid)
    return not fields or fields[0] in ("Z", "X")


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class LockInfo:
    """The contents of `_lock.json`."""

    owner: str
    host: str
    pid: int
    pid_namespace: str
    pid_start: str
    started: str
    heartbeat: float  # seconds since the epoch, refreshed while the job runs
    timeout: float  # the owner's: stale this long after `heartbeat`
    job: str = ""  # the job's fingerprint (see jobs.driver.PreparedJob.identity)

    @classmethod
    def mine(cls, timeout: float, job: str, clock: Callable[[], float]) -> LockInfo:
        now = clock()
        return cls(owner=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(),
                   pid_namespace=_pid_namespace(), pid_start=_proc_start(os.getpid()),
                   started=_iso(now), heartbeat=now, timeout=timeout, job=job)

    @classmethod
    def parse(cls, data: bytes) -> LockInfo | None:
        """None when `data` is not a lock this runner wrote (or is being written)."""
        try:
            value = json.loads(data)
            return cls(**{k: value[k] for k in cls.__dataclass_fields__ if k in value})
        except (ValueError, TypeError, KeyError):
            return None

    def to_bytes(self) -> bytes:
        data = asdict(self)
        data["heartbeat_utc"] = _iso(self.heartbeat)
        return json.dumps(data, indent=2).encode()

    def describe(self, now: float) -> str:
        return (f"job {self.owner[:12]} on host {self.host} (pid {self.pid}), started "
                f"{self.started}, last heartbeat {max(0.0, now - self.heartbeat):.0f}s ago")

    def dead_process(self) -> bool:
        """True when the owner ran on this host, in this PID namespace, and its process is gone."""
        if self.host != socket.gethostname() or not self.pid_namespace \
                or self.pid_namespace != _pid_namespace():
            return False
        if _proc_exited(self.pid):
            return True
        return bool(self.pid_start) and _proc_start(self.pid) != self.pid_start

    def stale_reason(self, now: float) -> str | None:
        """Why the lock no longer protects a running job, or None while it does."""
        age = now - self.heartbeat
        if age > self.timeout:
            return f"no heartbeat for {age:.0f}s (its timeout is {self.timeout:g}s)"
        if self.dead_process():
            return f"its process {self.pid} on this host has exited"
        return None


class OutputLock:
    """Holds `OUTPUT/_lock.json` for one job: `acquire()`, heartbeat thread, `check()`, `release()`."""

    def __init__(self, output_url: str, storage_options: Mapping[str, Any] | None = None,
                 timeout: float = 120.0, job: str = "",
                 clock: Callable[[], float] = time.time) -> None:
        self.output_url = output_url
        self.storage_options = dict(storage_options or {})
        fs, root = filesystem(output_url, self.storage_options)
        self.url = str(fs.unstrip_protocol(f"{root.rstrip('/')}/{LOCK_FILE}"))
        self.timeout = timeout
        self.clock = clock
        self.me = LockInfo.mine(timeout, job, clock)
        #: The stale lock this job took over, and why it was stale.
        self.took_over: tuple[LockInfo, str] | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def interval(self) -> float:
        return self.timeout / 4

    def read(self) -> LockInfo | None:
        """The lock in OUTPUT now; None if there is none. An unreadable one counts as fresh."""
        try:
            data = read_bytes(self.url, self.storage_options)
        except StorageError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                return None
            raise
        info = LockInfo.parse(data)
        if info is None:
            # Written by something else, or caught mid-write: held by an unknown job whose
            # heartbeat is the file's modification time.
            return LockInfo(owner="unknown", host="unknown", pid=0, pid_namespace="",
                            pid_start="", started="unknown", heartbeat=self._modified(),
                            timeout=self.timeout)
        return info

    def _modified(self) -> float:
        fs, path = filesystem(self.url, self.storage_options)
        try:
            info = fs.info(path)
        except (OSError, ValueError):
            return self.clock()
        value = info.get("mtime", info.get("LastModified"))
        if isinstance(value, dt.datetime):
            return value.timestamp()
        return float(value) if isinstance(value, int | float) else self.clock()

    def acquire(self, takeover: bool = False) -> None:
        """Take the lock, or raise OutputConflictError naming the job that holds it.

        A stale lock is taken over (and recorded in `took_over`); so is a fresh one when
        `takeover` is given.
        """
        for _ in range(5):
            self.me = replace(self.me, heartbeat=self.clock())
            if create_exclusive(self.url, self.me.to_bytes(), self.storage_options):
                break
            current = self.read()
            if current is None:
                continue  # released between our create and our read: try again
            if current.owner == self.me.owner:
                break  # our create landed, and its retry found it
            now = self.clock()
            reason = current.stale_reason(now)
            if reason is None and not takeover:
                raise OutputConflictError(
                    f"output '{self.output_url}' is locked by another job: "
                    f"{current.describe(now)}; wait for it to finish, or if it is dead, rerun "
                    f"after its lock goes stale ({current.timeout:g}s after its last "
                    "heartbeat), or pass --takeover to take the lock now (only if you know "
                    "it is not running)")
            # Delete only the lock we judged: if it changed meanwhile, judge the new one.
            if self.read() != current:
                continue
            remove_file(self.url, self.storage_options)
            self.took_over = (current, reason or "--takeover")
            # INFO: the driver prints the takeover for the user (see jobs.driver.run_job).
            log.info("taking over the lock on %s from %s: %s", self.output_url,
                     current.describe(now), reason or "--takeover")
        else:
            raise OutputConflictError(
                f"could not lock output '{self.output_url}': other jobs kept taking the lock; "
                "make sure one job at a time writes this output")
        self._start_heartbeat()

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="output-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        last_ok = self.clock()
        # Event.wait is the timer: it returns early when release() asks the thread to stop.
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
                last_ok = self.clock()
            except LostLockError as exc:
                self.lost = str(exc)
                return
            except StorageError as exc:
                log.warning("cannot refresh the lock on %s: %s", self.output_url, exc)
                if self.clock() - last_ok > self.timeout:
                    self.lost = (f"could not refresh the lock on output '{self.output_url}' for "
                                 f"{self.clock() - last_ok:.0f}s ({exc}); another job may have "
                                 "taken it over")
                    return

    def refresh(self) -> None:
        """Write a new heartbeat; LostLockError if the lock is no longer ours."""
        current = self.read()
        if current is None or current.owner != self.me.owner:
            holder = current.describe(self.clock()) if current else "nobody (it was removed)"
            raise LostLockError(f"this job lost its lock on output '{self.output_url}': it is "
                                f"now held by {holder}; another job took it over, so this one "
                                "stops without writing its manifest")
        self.me = replace(self.me, heartbeat=self.clock())
        write_bytes_atomic(self.url, self.me.to_bytes(), self.storage_options)

    def check(self) -> None:
        """Raise LostLockError if the heartbeat found the lock taken or could not refresh it."""
        if self.lost is not None:
            raise LostLockError(self.lost)

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.lost is not None:
            return
        try:
            current = self.read()
            if current is not None and current.owner == self.me.owner:
                remove_file(self.url, self.storage_options)
        except StorageError as exc:
            log.warning("could not remove the lock on %s (%s); the next run takes it over "
                        "once it is stale", self.output_url, exc)

    def to_json(self) -> dict[str, Any]:
        """What the manifest records about the lock."""
        out: dict[str, Any] = {"owner": self.me.owner, "host": self.me.host, "pid": self.me.pid,
                               "timeout": self.timeout}
        if self.took_over is not None:
            previous, reason = self.took_over
            out["took_over"] = {"owner": previous.owner, "host": previous.host,
                                "pid": previous.pid, "started": previous.started,
                                "heartbeat": _iso(previous.heartbeat), "reason": reason}
        return out

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
