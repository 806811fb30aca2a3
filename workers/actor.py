"""The shard worker: one per GPU (or CPU slot), holding one loaded backend for its lifetime.

Plain Python; the driver wraps it with `ray.remote`, so this package never imports Ray.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import socket
import threading
import time
from typing import Any

from workers import sched
from workers.backends import ModelFiles, create_backend
from workers.batching import token_budget
from workers.gpuimages import GpuImages, open_gpu_images
from workers.helpers import HelperProcesses
from workers.pipeline import process_shard
from workers.preprocess import tokenizes
from workers.redact import install_log_redaction
from workers.slots import SlotPool
from workers.spool import Spool
from workers.types import Shard, ShardResult, StageTimes, WorkerConfig


class ShardWorker:
    """Loads the model once, then processes shards one after another."""

    def __init__(self, config: WorkerConfig, model: bytes | ModelFiles) -> None:
        # Loading waits for `load()`, so a model that fails to load raises a task error whose
        # cause the driver can report, instead of an actor-creation failure.
        self.config = config
        install_log_redaction()  # storage clients in this actor log request URLs
        # `kill -USR1 <pid>` writes every thread's stack to the worker's log (a stuck shard).
        with contextlib.suppress(ValueError, AttributeError, OSError):
            faulthandler.register(signal.SIGUSR1, all_threads=True, chain=True)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        # Before any pool starts: the GIL's switch interval, the bulk work's priority.
        sched.configure(config.switch_interval_ms, config.helper_nice)
        # tokenizers runs a batch on Rayon's pool, sized when first used from this variable
        # (Ray sets OMP_NUM_THREADS for an actor, not this): size it to the CPUs it reserves.
        os.environ.setdefault("RAYON_NUM_THREADS", str(config.preprocess_threads))
        self.backend = create_backend(config.backend, model, config.backend_config)
        # Parts bound for an object store spool here, private to this actor; opening it removes
        # what killed actors on this node left (see workers.spool).
        self.spool = Spool.open()
        self.times = StageTimes()
        self.shards = 0
        self.rows = 0
        self.batches = 0
        # GPU backends: the K in-flight slots (streams, pinned and device buffers), opened and
        # warmed up by `load()` (or the first shard, if load was not called), reused for all.
        self.slots: SlotPool | None = None
        # GPU actors with image inputs: nvImageCodec and the fit kernel (`--image-decode`), and
        # how the images decode, in words, for the manifest.
        self.images: GpuImages | None = None
        self.image_decode = "cpu"
        # Worker processes for the host work that holds the GIL (tokenizing text; decoding PNG,
        # WebP, ... with Pillow), kept for every shard: starting them costs ~0.5 s. Text jobs
        # start them now, while the model loads (every row goes to them); image jobs at the
        # first image Pillow decodes (JPEGs never need them).
        self.processes = HelperProcesses(config.preprocess_threads)
        if config.preprocess_threads > 1 and tokenizes(config.preprocess):
            self.processes.start()
        self._loaded = False
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
        # Rows written so far per running shard, for the driver's progress (`progress()`). Its
        # own lock: `_lock` is held while the backend loads, and a poll must not wait for that.
        self._written: dict[str, int] = {}
        self._written_lock = threading.Lock()

    def process(self, shard: Shard) -> ShardResult:
        """Process and commit one shard (loading the backend first if `load()` was not called)."""
        with self._lock:
            self._load()
            if not self._active:
                self._active_since = time.perf_counter()
            self._active += 1
        with self._written_lock:
            self._written[shard.id] = 0
        try:
            return self._process(shard)
        finally:
            with self._written_lock:
                self._written.pop(shard.id, None)
            with self._lock:
                self._active -= 1
                if not self._active:
                    self.working_seconds += time.perf_counter() - self._active_since

    def progress(self) -> dict[str, int]:
        """Rows written so far (not yet committed) per shard this worker is running.

        Cheap and lock-light: the driver calls it every tick, in a concurrency group of its
        own, while `process` calls run (a CPU actor runs one at a time).
        """
        with self._written_lock:
            return dict(self._written)

    def _count(self, shard_id: str, rows: int) -> None:
        with self._written_lock:
            self._written[shard_id] = self._written.get(shard_id, 0) + rows

    def _process(self, shard: Shard) -> ShardResult:
        def on_rows(rows: int) -> None:
            self._count(shard.id, rows)

        if self.slots is None:
            # A synchronous backend (CPU, or a GPU model with dynamic shapes the slots cannot be
            # sized for) runs one shard at a time: its session or context is not thread-safe.
            with self._serial:
                result = process_shard(shard, self.config, self.backend, worker=self.name,
                                       spool_dir=self.spool.path, processes=self.processes,
                                       on_rows=on_rows)
        else:
            result = process_shard(shard, self.config, self.backend, worker=self.name,
                                   slots=self.slots, images=self.images,
                                   spool_dir=self.spool.path, processes=self.processes,
                                   on_rows=on_rows)
        with self._lock:
            self.times.add(result.times)
            self.shards += 1
            self.rows += result.rows
            self.batches += result.batches
        return result

    def stats(self) -> dict[str, Any]:
        """Totals over the shards this worker committed."""
        stats: dict[str, Any] = {
            "worker": self.name, "backend": self.backend.name, "shards": self.shards,
            "rows": self.rows, "batches": self.batches,
            "seconds": self.times.to_json(gpu=self.slots is not None),
            "working_seconds": round(self.working_seconds, 3),
            "readers": self.config.readers if self.slots else 1,
            "preprocess_threads": self.config.preprocess_threads,
            "image_decode": self.image_decode,
            **(self._image_stats() if self.images is not None else {})}
        if self.slots is None:
            return stats  # the CPU path: no slots, no GPU to be busy
        busy = self.slots.busy.seconds
        return {**stats, "slots": len(self.slots.slots),
                "warmup_seconds": round(self.warmup_seconds, 3),
                # The union of every batch's execution over the worker's working time: summed
                # per-shard figures would count twice while two shards' batches overlap.
                "gpu_busy_seconds": round(busy, 3),
                "gpu_busy_fraction": round(busy / self.working_seconds, 4)
                if self.working_seconds > 0 else 0.0}

    def _image_stats(self) -> dict[str, Any]:
        """The rows each side decoded, and (decode auto's libjpeg-turbo path) how often and for
        how long it pinned host memory."""
        assert self.images is not None
        images = self.images.stats()
        return {"image_rows": {"gpu": images["gpu_rows"], "cpu": images["cpu_rows"]},
                **({"image_pinned": images["pinned"]} if "pinned" in images else {})}

    def _load(self) -> None:
        """Load the backend and, on a GPU, open the slots, warm them up and open GPU image
        decoding (`--image-decode`); idempotent."""
        if self._loaded:
            return
        self.backend.load()
        budget = token_budget(self.config, self.backend.inputs)
        if self.backend.uses_slots and SlotPool.fits(self.backend, budget):
            slots = SlotPool.for_job(self.backend, self.config, budget)
            try:
                self.warmup_seconds = slots.warm_up()
                self.images, self.image_decode = open_gpu_images(
                    self.config.preprocess, {m.name: m for m in self.backend.inputs}, True,
                    self.config.backend_config.device_id, self.config.preprocess_threads,
                    self.config.at_size_images)
            except BaseException:
                slots.close()
                raise
            self.slots = slots
        else:
            # Raises for --image-decode gpu on a CPU actor; auto decodes on the CPU.
            _, self.image_decode = open_gpu_images(self.config.preprocess, {}, False)
        self._loaded = True

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
                "device": getattr(self.backend, "device", "cpu"),
                "slots": len(self.slots.slots) if self.slots is not None else 0}

    def close(self) -> None:
        if self.slots is not None:
            self.slots.close()  # waits for the slots' streams, which read the images' buffers
            self.slots = None
        if self.images is not None:
            self.images.close()
            self.images = None
        self.processes.close()
        self._loaded = False
        self.backend.close()
        self.spool.close()
