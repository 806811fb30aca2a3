"""Telling whether a process (by pid and start time) still runs on this host; Linux /proc."""

from __future__ import annotations

import os


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (which may hold spaces and ')')."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot, to tell a reused pid apart ("" if
    unknown)."""
    fields = _stat_fields(pid)
    return fields[19] if len(fields) > 19 else ""


def pid_namespace() -> str:
    """This process's PID namespace ("pid:[4026531836]"), "" where /proc does not say."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def is_running(pid: int, start: str) -> bool:
    """True while process `pid` of this PID namespace, started at `start`, has not exited.

    A zombie (exited, not yet reaped: containers whose PID 1 does not reap keep them) has
    exited. An empty `start` matches any process with that pid.
    """
    fields = _stat_fields(pid)
    if not fields:
        return False
    if fields[0] in ("Z", "X"):
        return False
    return not start or (len(fields) > 19 and fields[19] == start)
