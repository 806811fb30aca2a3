"""The shard worker: one per GPU (or CPU slot), holding one loaded backend for its lifetime.

Plain Python; the driver wraps it with `ray.remote`, so this package never imports Ray.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

from workers.backends import create_backend
from workers.batching import token_budget
from workers.pipeline import process_shard
from workers.slots import SlotPool
from workers.types import Shard, ShardResult, StageTimes, WorkerConfig


class ShardWorker:
    """Loads the model once, then processes shards one after another."""

    def __init__(self, config: WorkerConfig, model: bytes) -> None:
        # Loading waits for `load()`, so a model that fails to load raises a task error whose
        # cause the driver can report, instead of an actor-creation failure.
        self.config = config
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        # tokenizers runs a batch on Rayon's pool, sized when first used from this variable
        # (Ray sets OMP_NUM_THREADS for an actor, not this): size it to the CPUs it reserves.
        os.environ.setdefault("RAYON_NUM_THREADS", str(config.preprocess_threads))
        self.backend = create_backend(config.backend, model, config.backend_config)
        self.times = StageTimes()
        self.shards = 0
        self.rows = 0
        self.batches = 0
        # GPU backends: the K in-flight slots (streams, pinned and device buffers), opened and
        # warmed up by `load()` (or the first shard, if load was not called), reused for all.
        self.slots: SlotPool | None = None
        #: Seconds the slots' warm-up batch took (0 on the CPU path).
        self.warmup_seconds = 0.0
        # Calls may run concurrently (an actor with two shards in flight): the second reads
        # ahead while the first holds the slots (`SlotPool.turn`); this guards the shared state.
        self._lock = threading.Lock()
        self._serial = threading.Lock()
        # Wall time with at least one call running (overlapping calls counted once): the
        # denominator of the worker's GPU busy fraction.
        self.working_seconds = 0.0
        self._active = 0
        self._active_since = 0.0

    def process(self, shard: Shard) -> ShardResult:
        """Process and commit one shard (loading the backend first if `load()` was not called)."""
        with self._lock:
            self._load()
            if not self._active:
                self._active_since = time.perf_counter()
            self._active += 1
        try:
            return self._process(shard)
        finally:
            with self._lock:
                self._active -= 1
                if not self._active:
                    self.working_seconds += time.perf_counter() - self._active_since

    def _process(self, shard: Shard) -> ShardResult:
        if self.slots is None:
            # A synchronous backend (CPU, or a GPU model with dynamic shapes the slots cannot be
            # sized for) runs one shard at a time: its session or context is not thread-safe.
            with self._serial:
                result = process_shard(shard, self.config, self.backend, worker=self.name)
        else:
            result = process_shard(shard, self.config, self.backend, worker=self.name,
                                   slots=self.slots)
        with self._lock:
            self.times.add(result.times)
            self.shards += 1
            self.rows += result.rows
            self.batches += result.batches
        return result

    def stats(self) -> dict[str, Any]:
        """Totals over the shards this worker committed."""
        busy = self.slots.busy.seconds if self.slots is not None else 0.0
        return {"worker": self.name, "backend": self.backend.name, "shards": self.shards,
                "rows": self.rows, "batches": self.batches, "seconds": vars(self.times).copy(),
                "slots": len(self.slots.slots) if self.slots else 0,
                "warmup_seconds": round(self.warmup_seconds, 3),
                "working_seconds": round(self.working_seconds, 3),
                # The union of every batch's execution over the worker's working time: summed
                # per-shard figures would count twice while two shards' batches overlap.
                "gpu_busy_seconds": round(busy, 3),
                "gpu_busy_fraction": round(busy / self.working_seconds, 4)
                if self.working_seconds > 0 else 0.0}

    def _load(self) -> None:
        """Load the backend and, on a GPU, open the slots and warm them up; idempotent."""
        self.backend.load()
        budget = token_budget(self.config, self.backend.inputs)
        if self.slots is None and self.backend.uses_slots and SlotPool.fits(self.backend, budget):
            slots = SlotPool.for_job(self.backend, self.config, budget)
            try:
                self.warmup_seconds = slots.warm_up()
            except BaseException:
                slots.close()
                raise
            self.slots = slots

    def load(self) -> dict[str, Any]:
        """Load the backend (and warm its GPU slots up); the worker's name, backend and tensors.

        The driver calls this on every actor at once before handing out shards, so one-time
        costs (sessions per slot, algorithm search) are paid in parallel, not by first shards.
        """
        with self._lock:
            self._load()
        return {"worker": self.name, "backend": self.backend.name,
                "inputs": [m.to_json() for m in self.backend.inputs],
                "outputs": [m.to_json() for m in self.backend.outputs],
                "device": getattr(self.backend, "device", "cpu")}

    def close(self) -> None:
        if self.slots is not None:
            self.slots.close()
            self.slots = None
        self.backend.close()
