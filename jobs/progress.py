"""Progress on the driver: a live bar on a terminal, periodic lines in logs (`ray job submit`)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Rows, rows/s, shards done/failed and ETA; `live` redraws one line, else logs every `every` s."""

    def __init__(self, total_rows: int, total_shards: int, *, live: bool | None = None,
                 stream: TextIO | None = None, every: float = 10.0) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.total_rows, self.total_shards = total_rows, total_shards
        self.rows = self.shards = self.failed = 0
        self.every = every
        self.started = time.monotonic()
        self._last = 0.0

    def update(self, rows: int = 0, shards: int = 0, failed: int = 0) -> None:
        self.rows += rows
        self.shards += shards
        self.failed += failed
        self.render()

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = self.rows / elapsed if elapsed > 0 else 0.0
        left = self.total_rows - self.rows
        eta = _clock(left / rate) if rate > 0 and left > 0 else "--:--:--" if left else "0:00:00"
        frac = self.rows / self.total_rows if self.total_rows else 1.0
        bar = "#" * int(frac * 24)
        failed = f", {self.failed} failed" if self.failed else ""
        return (f"[{bar:<24}] {frac:6.1%} {self.rows:,}/{self.total_rows:,} rows  "
                f"{rate:,.0f} rows/s  shards {self.shards}/{self.total_shards}{failed}  "
                f"elapsed {_clock(elapsed)}  ETA {eta}")

    def render(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.live:
            if force or now - self._last >= 0.2:
                self.stream.write("\r" + self.line())
                self.stream.flush()
                self._last = now
        elif force or now - self._last >= self.every:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self._last = now

    def close(self) -> None:
        self.render(force=True)
        if self.live:
            self.stream.write("\n")
            self.stream.flush()
