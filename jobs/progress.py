"""Progress on the driver: a live bar on a terminal, a line every 10 s in logs (`ray job logs`).

The bar is tqdm's: it fits the terminal's width as it is now (a hand-written one drew ~105
characters, and every redraw wrapped in an 80-column terminal), and keeps its own rate and ETA.
Rows move per batch: `running(rows)` sets the rows the actors have written of shards still
running, `update(...)` adds a finished shard's.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO

from tqdm import tqdm


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Rows, rows/s, shards done/failed and ETA; `live` redraws a bar, else logs every `every` s."""

    def __init__(self, total_rows: int, total_shards: int, *, live: bool | None = None,
                 stream: TextIO | None = None, every: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.total_rows, self.total_shards = total_rows, total_shards
        self.done_rows = self.shards = self.failed = 0
        #: Rows the actors have written per running shard; a finished shard's leave it, and a
        #: poll answered before it finished cannot bring them back (they would count twice).
        self._running: dict[str, int] = {}
        self._finished: set[str] = set()
        self.every = every
        self.clock = clock
        self.started = clock()
        self._last = self.started
        self._bar: tqdm | None = None
        if self.live:
            # dynamic_ncols: the width is read from the terminal at every redraw (a resized
            # tmux pane too); the text beyond it is cut, never wrapped.
            self._bar = tqdm(total=total_rows, file=self.stream, dynamic_ncols=True,
                             unit=" rows", unit_scale=True, mininterval=0.2, smoothing=0.1,
                             bar_format="{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} rows "
                             "{rate_fmt} ETA {remaining}{postfix}")
            self._bar.set_postfix_str(self._shards(), refresh=False)

    @property
    def running_rows(self) -> int:
        """Rows written so far by shards still running."""
        return sum(self._running.values())

    @property
    def rows(self) -> int:
        """Rows processed: of finished shards, and written so far by shards still running."""
        return self.done_rows + self.running_rows

    def update(self, rows: int = 0, shards: int = 0, failed: int = 0, shard_id: str = "") -> None:
        """Shard `shard_id` finished: `rows` of it committed (`shards=1`), or it failed
        (`failed=1`); its running rows leave the count."""
        self.done_rows += rows
        self.shards += shards
        self.failed += failed
        if shard_id:
            self._finished.add(shard_id)
            self._running.pop(shard_id, None)
        self.render()

    def running(self, rows: Mapping[str, int]) -> None:
        """The rows the actors have written of each shard they are running."""
        self._running = {sid: n for sid, n in rows.items() if sid not in self._finished}
        self.render()

    def _shards(self) -> str:
        failed = f", {self.failed} failed" if self.failed else ""
        return f"shards {self.shards}/{self.total_shards}{failed}"

    def line(self) -> str:
        """The log line: the whole state, whatever its width (logs do not wrap)."""
        elapsed = self.clock() - self.started
        rows = self.rows
        rate = rows / elapsed if elapsed > 0 else 0.0
        left = self.total_rows - rows
        eta = _clock(left / rate) if rate > 0 and left > 0 else "--:--:--" if left > 0 else "0:00:00"
        frac = min(1.0, rows / self.total_rows) if self.total_rows else 1.0
        bar = "#" * int(frac * 24)
        return (f"[{bar:<24}] {frac:6.1%} {rows:,}/{self.total_rows:,} rows  "
                f"{rate:,.0f} rows/s  {self._shards()}  elapsed {_clock(elapsed)}  ETA {eta}")

    def render(self, force: bool = False) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(self._shards(), refresh=False)
            # Negative when a failed shard's written rows drop out of the running count.
            self._bar.update(self.rows - self._bar.n)
            if force:
                self._bar.refresh()
            return
        now = self.clock()
        if force or now - self._last >= self.every:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self._last = now

    def close(self) -> None:
        if self._bar is not None:
            self.render(force=True)
            self._bar.close()  # leaves the last bar on screen, then a newline
            self._bar = None
        else:
            self.render(force=True)
