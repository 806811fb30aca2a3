"""Helper processes for the host work that holds the GIL: Pillow decoding and tokenizing.

Threads take turns on the GIL. Pillow holds it for most of a decode. `tokenizers` releases it
while it tokenizes but holds it while it turns each row's encoding into Python objects and
lists, about a sixth of a ~28-token review's work (a Python thread kept 84% of its speed beside
one tokenizing thread), so tokenizing threads stop scaling near six cores; processes do not
share a GIL (`bench/text_host.py` and `bench/text.py` (b) measure threads against them). One
owner (the actor, for all its shards) keeps the processes.
"""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor

from workers.sched import helper_nice, lower_this_process


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
                # Below the actor's threads that feed the GPU (`workers.sched`).
                self._pool = ProcessPoolExecutor(self.processes, mp_context=context,
                                                 initializer=lower_this_process,
                                                 initargs=(helper_nice(),))
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
