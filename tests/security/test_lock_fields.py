"""Issue 17, point 9: the output lock judges staleness by the reader's timeout, not the file's.

A lock file is written by whoever can write OUTPUT: its `timeout` must not decide when another
job may take it over, and fields that are not what this runner writes (NaN, infinity, strings)
are a clear error naming the file, never a permanent lock or a raw TypeError.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from jobs.lease import LOCK_FILE, OutputLock
from workers.errors import OutputConflictError

NOW = 1_800_000_000.0


def plant(out: Path, **fields: Any) -> Path:
    """A lock as another job (or someone with write access to OUTPUT) would leave it."""
    lock = {"owner": "f" * 32, "host": "other-host", "pid": 4242, "pid_namespace": "pid:[1]",
            "pid_start": "1", "started": "2026-01-01T00:00:00+00:00", "heartbeat": NOW - 5,
            "timeout": 120.0, "job": ""}
    lock.update(fields)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    # json.dumps writes NaN and Infinity as the bare words JSON parsers accept.
    path.write_text(json.dumps(lock))
    return path


def test_a_forged_short_timeout_does_not_make_a_live_lock_stale(tmp_path: Path) -> None:
    """The lock file says timeout 0.001 s; the reader waits its own 120 s."""
    plant(tmp_path / "out", timeout=0.001, heartbeat=NOW - 5)
    with pytest.raises(OutputConflictError, match=r"is locked by another job: job ffffffffffff "
                       r".*last heartbeat 5s ago; .*rerun after its lock goes stale \(120s after "
                       r"its last heartbeat\)"):
        OutputLock(str(tmp_path / "out"), timeout=120, clock=lambda: NOW).acquire()


def test_a_long_timeout_in_the_file_does_not_keep_a_dead_lock(tmp_path: Path) -> None:
    """The lock file says timeout 1e12 s; the reader's 60 s have passed since its heartbeat."""
    plant(tmp_path / "out", timeout=1e12, heartbeat=NOW - 600)
    lock = OutputLock(str(tmp_path / "out"), timeout=60, clock=lambda: NOW)
    lock.acquire()
    assert lock.took_over is not None
    assert lock.took_over[1] == "no heartbeat for 600s (this job's lock timeout is 60s)"
    lock.release()


@pytest.mark.parametrize(("field", "value", "why"), [
    ("heartbeat", float("nan"), "heartbeat is nan, expected seconds since the epoch"),
    ("heartbeat", float("inf"), "heartbeat is inf, expected seconds since the epoch"),
    ("heartbeat", "soon", "heartbeat is 'soon', expected seconds since the epoch"),
    ("heartbeat", True, "heartbeat is True, expected seconds since the epoch"),
    ("timeout", float("nan"), "timeout is nan, expected a number of seconds > 0"),
    ("timeout", "forever", "timeout is 'forever', expected a number of seconds > 0"),
    ("pid", "4242", "pid is '4242', expected a process id"),
    ("owner", 7, "owner is 7, expected a string"),
])
def test_malformed_fields_are_a_clear_error_naming_the_file(
        tmp_path: Path, field: str, value: Any, why: str) -> None:
    path = plant(tmp_path / "out", **{field: value})
    with pytest.raises(OutputConflictError) as caught:
        OutputLock(str(tmp_path / "out"), timeout=60, clock=lambda: NOW).acquire()
    message = str(caught.value)
    assert message.startswith(f"output lock 'file://{path}' is malformed ({why}); ")
    assert "pass --takeover to remove it" in message
    # --takeover replaces a malformed lock (the user has checked no job is running).
    lock = OutputLock(str(tmp_path / "out"), timeout=60, clock=lambda: NOW)
    lock.acquire(takeover=True)
    assert lock.took_over is not None and lock.took_over[1] == "--takeover"
    lock.release()


def test_a_lock_that_is_not_json_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    path = tmp_path / "out" / LOCK_FILE
    path.write_text("{not json")
    with pytest.raises(OutputConflictError, match=(
            rf"output lock 'file://{path}' is malformed \(not a JSON object\); it was not written by "
            r"this runner, or is damaged: make sure no job is writing this output, then pass "
            r"--takeover to remove it")):
        OutputLock(str(tmp_path / "out"), timeout=60, clock=lambda: NOW).acquire()
