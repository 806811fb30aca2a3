"""GPU time accounting: the time at least one batch was executing, as a union of spans."""

from __future__ import annotations

import threading


def busy_seconds(spans: list[tuple[float, float]]) -> float:
    """Length of the union of `[start, end)` spans: time at least one batch was executing."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


class BusyTime:
    """The union length of `[start, end)` spans added over a long run, in bounded memory.

    Spans arrive about in time order (batches are collected within seconds of each other), so
    merged intervals that ended `horizon` seconds before the latest start are folded into a
    total and forgotten.
    """

    def __init__(self, horizon: float = 60.0, keep: int = 256) -> None:
        self.horizon = horizon
        self.keep = keep
        self._lock = threading.Lock()
        self._settled = 0.0
        self._open: list[tuple[float, float]] = []
        self._latest = float("-inf")
        # Settle again once the list doubles: amortized O(log n) per span even when many spans
        # stay within the horizon (small batches with gaps between them).
        self._limit = keep

    def add(self, start: float, end: float) -> None:
        with self._lock:
            self._open.append((start, end))
            self._latest = max(self._latest, start)
            if len(self._open) > self._limit:
                self._settle()
                self._limit = max(self.keep, 2 * len(self._open))

    def _settle(self) -> None:
        merged: list[tuple[float, float]] = []
        for start, end in sorted(self._open):
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        cutoff = self._latest - self.horizon
        self._settled += sum(end - start for start, end in merged if end < cutoff)
        self._open = [span for span in merged if span[1] >= cutoff]

    @property
    def seconds(self) -> float:
        with self._lock:
            return self._settled + busy_seconds(self._open)

    @property
    def pending(self) -> int:
        """Spans held unmerged (for tests: memory stays bounded)."""
        return len(self._open)
