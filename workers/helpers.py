"""Helper processes for the host work that holds the GIL: Pillow decoding and tokenizing.

Threads take turns on the GIL. Pillow holds it for most of a decode, and `tokenizers` holds it
while it turns a batch's Rust encodings into Python objects and lists, which is most of a short
row's cost: two tokenizing threads on two cores ran 1.1x one; two processes 1.9x
(`bench/text_host.py`). One owner (the actor, for all its shards) keeps the processes.
"""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor


def _ready() -> None:
    """A warm-up task: the process exists, with this module's imports done."""


class HelperProcesses:
    """A pool of `processes` worker processes, started at first use; `close()` stops them.

    `forkserver`: the actor's own threads (Ray's, the pipeline's) are not forked into them.
    """

    def __init__(self, processes: int) -> None:
        self.processes = max(1, processes)
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                context = multiprocessing.get_context("forkserver")
                self._pool = ProcessPoolExecutor(self.processes, mp_context=context)
            return self._pool

    def start(self) -> None:
        """Start every process now, without waiting for them (a pool starts one per task)."""
        pool = self.pool()
        for _ in range(self.processes):
            pool.submit(_ready)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(cancel_futures=True)
