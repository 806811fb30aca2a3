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
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from workers.errors import OutputConflictError, StorageError
from workers.processes import pid_namespace, process_start
from workers.redact import redact
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


class MalformedLockError(OutputConflictError):
    """OUTPUT's lock file is not a lock this runner wrote: not JSON, or a field of the wrong kind."""


def _finite(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


# What each field of a lock must be, and how the error says so.
_FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "owner": (lambda v: isinstance(v, str), "a string"),
    "host": (lambda v: isinstance(v, str), "a string"),
    "pid": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
            "a process id"),
    "pid_namespace": (lambda v: isinstance(v, str), "a string"),
    "pid_start": (lambda v: isinstance(v, str), "a string"),
    "started": (lambda v: isinstance(v, str), "a string"),
    "heartbeat": (_finite, "seconds since the epoch"),
    "timeout": (lambda v: _finite(v) and v > 0, "a number of seconds > 0"),
    "job": (lambda v: isinstance(v, str), "a string"),
}


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
    # The owner's --lock-timeout, recorded for people reading the file; readers judge staleness
    # by their own timeout, never by this value (anyone who can write OUTPUT can write it).
    timeout: float
    job: str = ""  # the job's fingerprint (see jobs.driver.PreparedJob.identity)

    @classmethod
    def mine(cls, timeout: float, job: str, clock: Callable[[], float]) -> LockInfo:
        now = clock()
        return cls(owner=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(),
                   pid_namespace=pid_namespace(), pid_start=process_start(os.getpid()),
                   started=_iso(now), heartbeat=now, timeout=timeout, job=job)

    @classmethod
    def parse(cls, data: bytes, url: str = LOCK_FILE) -> LockInfo:
        """The lock in `data`; MalformedLockError naming `url` when it is not one this runner
        writes (locks are written whole, so a reader never sees one half-written)."""
        try:
            value = json.loads(data)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise _malformed(url, "not a JSON object")
        for name, (valid, expected) in _FIELD_RULES.items():
            if name not in value:
                if name == "job":
                    continue  # locks of runners before the job fingerprint lack it
                raise _malformed(url, f"{name} is missing")
            if not valid(value[name]):
                raise _malformed(url, f"{name} is {value[name]!r}, expected {expected}")
        return cls(**{k: value[k] for k in cls.__dataclass_fields__ if k in value})

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
                or self.pid_namespace != pid_namespace():
            return False
        if not os.path.exists(f"/proc/{self.pid}"):
            return True
        return bool(self.pid_start) and process_start(self.pid) != self.pid_start

    def stale_reason(self, now: float, timeout: float) -> str | None:
        """Why the lock no longer protects a running job, or None while it does.

        `timeout`: the reader's own lock timeout, not the one the file records.
        """
        age = now - self.heartbeat
        if age > timeout:
            return f"no heartbeat for {age:.0f}s (this job's lock timeout is {timeout:g}s)"
        if self.dead_process():
            return f"its process {self.pid} on this host has exited"
        return None


def _malformed(url: str, why: str) -> MalformedLockError:
    return MalformedLockError(
        f"output lock '{url}' is malformed ({why}); it was not written by this runner, or is "
        "damaged: make sure no job is writing this output, then pass --takeover to remove it")


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

    def _read_raw(self) -> bytes | None:
        """The lock file's bytes; None if there is none."""
        try:
            return read_bytes(self.url, self.storage_options)
        except StorageError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                return None
            raise

    def read(self) -> LockInfo | None:
        """The lock in OUTPUT now; None if there is none, MalformedLockError if it is not a lock."""
        data = self._read_raw()
        return None if data is None else LockInfo.parse(data, self.url)

    def _modified(self) -> float:
        fs, path = filesystem(self.url, self.storage_options)
        try:
            info = fs.info(path)
        except (OSError, ValueError):
            return self.clock()
        value = info.get("mtime", info.get("LastModified"))
        if isinstance(value, dt.datetime):
            return value.timestamp()
        return float(value) if _finite(value) else self.clock()

    def _judge(self, data: bytes, takeover: bool) -> tuple[LockInfo, str | None]:
        """The lock in `data` and why it is stale (None: it is fresh); a malformed lock raises
        unless `takeover`, which replaces it like any other."""
        try:
            current = LockInfo.parse(data, self.url)
        except MalformedLockError:
            if not takeover:
                raise
            return LockInfo(owner="malformed", host="unknown", pid=0, pid_namespace="",
                            pid_start="", started="unknown", heartbeat=self._modified(),
                            timeout=self.timeout), None
        return current, current.stale_reason(self.clock(), self.timeout)

    def acquire(self, takeover: bool = False) -> None:
        """Take the lock, or raise OutputConflictError naming the job that holds it.

        A stale lock is taken over (and recorded in `took_over`); so is a fresh one when
        `takeover` is given.
        """
        for _ in range(5):
            self.me = replace(self.me, heartbeat=self.clock())
            if create_exclusive(self.url, self.me.to_bytes(), self.storage_options):
                break
            data = self._read_raw()
            if data is None:
                continue  # released between our create and our read: try again
            current, reason = self._judge(data, takeover)
            if current.owner == self.me.owner:
                break  # our create landed, and its retry found it
            now = self.clock()
            if reason is None and not takeover:
                raise OutputConflictError(
                    f"output '{self.output_url}' is locked by another job: "
                    f"{current.describe(now)}; wait for it to finish, or if it is dead, rerun "
                    f"after its lock goes stale ({self.timeout:g}s after its last "
                    "heartbeat), or pass --takeover to take the lock now (only if you know "
                    "it is not running)")
            # Delete only the lock we judged: if it changed meanwhile, judge the new one.
            if self._read_raw() != data:
                continue
            remove_file(self.url, self.storage_options)
            self.took_over = (current, reason or "--takeover")
            # INFO: the driver prints the takeover for the user (see jobs.driver.run_job).
            log.info("taking over the lock on %s from %s: %s", redact(self.output_url),
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
                log.warning("cannot refresh the lock on %s: %s", redact(self.output_url), exc)
                if self.clock() - last_ok > self.timeout:
                    self.lost = (f"could not refresh the lock on output '{self.output_url}' for "
                                 f"{self.clock() - last_ok:.0f}s ({exc}); another job may have "
                                 "taken it over")
                    return

    def refresh(self) -> None:
        """Write a new heartbeat; LostLockError if the lock is no longer ours."""
        try:
            current = self.read()
        except MalformedLockError as exc:
            raise LostLockError(f"this job lost its lock on output '{self.output_url}': {exc}"
                                ) from exc
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
        except MalformedLockError:
            pass  # not ours any more: someone replaced it, and it is theirs to remove
        except StorageError as exc:
            log.warning("could not remove the lock on %s (%s); the next run takes it over "
                        "once it is stale", redact(self.output_url), exc)

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
