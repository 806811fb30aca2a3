"""The driver's progress: a bar that fits the terminal, and periodic lines for logs."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import termios

from jobs.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def terminal(columns: int) -> tuple[int, io.TextIOWrapper]:
    """A pseudo-terminal `columns` wide: (the reading end, the writing end as a text stream)."""
    reader, writer = pty.openpty()
    fcntl.ioctl(writer, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    attrs = termios.tcgetattr(writer)
    attrs[1] &= ~termios.OPOST  # no "\n" -> "\r\n": the bytes as written
    termios.tcsetattr(writer, termios.TCSANOW, attrs)
    return reader, io.TextIOWrapper(os.fdopen(writer, "wb", buffering=0), encoding="utf-8",
                                    write_through=True)


def drain(reader: int) -> str:
    chunks = []
    os.set_blocking(reader, False)
    while True:
        try:
            chunk = os.read(reader, 65536)
        except (BlockingIOError, OSError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


def redraws(text: str) -> list[str]:
    """What each redraw left on the screen's line (cursor moves and clears dropped)."""
    plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
    return [part for line in plain.split("\n") for part in line.split("\r") if part.strip()]


def test_the_live_bar_fits_an_80_column_terminal() -> None:
    """The hand-written bar drew ~105 characters: every redraw wrapped in tmux's 80 columns."""
    reader, stream = terminal(80)
    clock = Clock()
    progress = Progress(1_234_567, 1_000, live=True, stream=stream, clock=clock)
    for step in range(1, 40):
        clock.now += 0.5
        progress.running({"s": step * 1_000})
        if step % 10 == 0:
            progress.update(rows=10_000, shards=1, failed=1)
        progress.render()
    progress.close()
    stream.close()
    shown = redraws(drain(reader))
    assert len(shown) >= 2, shown
    assert all(len(line) <= 80 for line in shown), [len(line) for line in shown]
    last = shown[-1]
    assert "rows" in last and "rows/s" in last and "shards 3/1000" in last
    assert "3 failed" in last and "ETA" in last


def test_the_bar_counts_rows_of_shards_still_running() -> None:
    stream = io.StringIO()
    clock = Clock()
    progress = Progress(1_000, 4, live=False, stream=stream, clock=clock)
    clock.now += 2
    progress.running({"a": 250, "b": 50})  # written by the actors, not yet committed
    assert progress.rows == 300
    assert progress.line().startswith("[#######                 ]  30.0% 300/1,000 rows  150 rows/s")
    progress.update(rows=250, shards=1, shard_id="a")  # shard a committed: its 250 rows
    assert progress.rows == 300 and "shards 1/4" in progress.line()
    # A poll answered before shard a finished still has its rows: they count once, not twice
    # (3,237 of 3,000 rows at the end of a run, before).
    progress.running({"a": 250, "b": 50})
    assert progress.rows == 300
    progress.update(failed=1, shard_id="b")  # a failed shard's written rows drop out
    assert progress.rows == 250


def test_logs_get_a_line_every_ten_seconds() -> None:
    stream = io.StringIO()
    clock = Clock()
    progress = Progress(1_000, 4, live=False, stream=stream, clock=clock)
    for _ in range(25):
        clock.now += 1
        progress.running({"s": progress.running_rows + 10})
        progress.render()
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3  # at 10 s, at 20 s, and the last one
    assert all("rows/s" in line and "shards 0/4" in line and "ETA" in line for line in lines)
    assert "250/1,000 rows" in lines[-1]
