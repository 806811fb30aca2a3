"""What a benchmark run costs, sampled from outside: memory and CPU of the process tree, first output.

The Ray cluster that `ray.init()` starts is a subtree of this process (GCS, raylet, and the
workers the raylet forks), so summing over this process's descendants covers the driver, every
actor and task, and the object store, and nothing of other users' processes on the machine.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import psutil

MiB = 2**20


@dataclass
class Usage:
    """Peak memory the run added to the tree, CPU seconds, when the first complete output appeared."""

    peak_bytes: int = 0
    cpu_seconds: float = 0.0
    first_output_s: float | None = None
    samples: int = 0
    monitor_cpu_s: float = 0.0  # what sampling itself cost (in this driver process)
    excluded_cpu_s: float = 0.0  # CPU of the excluded processes (the storage server)
    cpu_by_title: dict[str, float] = field(default_factory=dict)  # "driver", "ray::X", "raylet"


def _pss(proc: psutil.Process) -> int:
    """Proportional set size: shared pages (the object store, libraries) counted once over the tree."""
    try:
        return int(proc.memory_full_info().pss)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, AttributeError):
        return 0


def _title(proc: psutil.Process) -> str:
    """What a process is: `ray::ShardWorker` for a Ray worker (its method dropped), else its name."""
    try:
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""
    first = cmdline[0] if cmdline else ""
    if any("multiprocessing" in arg for arg in cmdline[1:3]):
        return "helper processes"  # an actor's forkserver and its pool (workers.helpers)
    if first.startswith("ray::"):
        return first.split(" ")[0].split(".")[0]
    return os.path.basename(first) if len(cmdline) < 2 or "python" not in first \
        else os.path.basename(next((a for a in cmdline[1:] if not a.startswith("-")), first))


def _cpu(proc: psutil.Process) -> float | None:
    try:
        t = proc.cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    return float(t.user + t.system)


class TreeMonitor:
    """Samples PSS and CPU time of this process and its descendants until stopped.

    `exclude` names processes (and their subtrees) left out, such as the S3 server, whose work
    is the storage service's rather than the pipeline's. `first_output` is polled each sample;
    it returns True once a complete output file exists. `on_sample` runs after each sample.
    """

    def __init__(self, exclude: Iterable[int] = (), interval: float = 0.2,
                 first_output: Callable[[], bool] | None = None,
                 on_sample: Callable[[], None] | None = None, tree_every: int = 5) -> None:
        self.root = psutil.Process(os.getpid())
        self.exclude = set(exclude)
        self.interval = interval
        # Reading every process's smaps costs the driver real CPU on a small machine: the
        # output probe runs each interval, the tree's memory and CPU every `tree_every`.
        self.tree_every = max(1, tree_every)
        self._ticks = 0
        self.first_output = first_output
        self.on_sample = on_sample
        self.usage = Usage()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tree-monitor")
        self._cpu_start: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._titles: dict[int, str] = {}
        self._pss_start: dict[int, int] = {}
        self._excluded_start: dict[int, float] = {}
        self._started = 0.0

    def _excluded_cpu(self) -> dict[int, float]:
        seconds = {}
        for pid in self.exclude:
            try:
                cpu = _cpu(psutil.Process(pid))
            except psutil.NoSuchProcess:
                continue
            if cpu is not None:
                seconds[pid] = cpu
        return seconds

    def _tree(self) -> list[psutil.Process]:
        procs = [self.root]
        excluded: set[int] = set()
        for child in self.root.children(recursive=True):
            try:
                parent = child.ppid()
            except psutil.NoSuchProcess:
                continue
            if child.pid in self.exclude or parent in excluded:
                excluded.add(child.pid)
                continue
            procs.append(child)
        return procs

    def _sample_tree(self) -> None:
        total = 0
        for proc in self._tree():
            # Growth per process: a process that existed before the run (an idle worker left
            # by an earlier run) and shrinks, or exits, must not offset what this run adds.
            total += max(0, _pss(proc) - self._pss_start.get(proc.pid, 0))
            cpu = _cpu(proc)
            if cpu is not None:
                self._cpu_last[proc.pid] = cpu
            # Pooled workers go back to `ray::IDLE` between tasks: keep the last busy title.
            title = "driver" if proc.pid == self.root.pid else _title(proc)
            if title and (title != "ray::IDLE" or proc.pid not in self._titles):
                self._titles[proc.pid] = title
        self.usage.peak_bytes = max(self.usage.peak_bytes, total)
        self.usage.samples += 1

    def _sample(self, final: bool = False) -> None:
        if final or self._ticks % self.tree_every == 0:
            self._sample_tree()
        self._ticks += 1
        if self.usage.first_output_s is None and self.first_output is not None:
            try:
                found = self.first_output()
            except OSError:
                found = False
            if found:
                self.usage.first_output_s = time.perf_counter() - self._started
        if self.on_sample is not None:
            self.on_sample()

    def _run(self) -> None:
        cpu = time.thread_time()
        # The event's timeout is the sampling period; stop() ends the wait at once.
        while not self._stop.wait(self.interval):
            self._sample()
        self.usage.monitor_cpu_s = time.thread_time() - cpu

    def start(self) -> TreeMonitor:
        """Measure each process of the idle tree (the baselines), then sample on a thread."""
        tree = self._tree()
        for proc in tree:
            self._pss_start[proc.pid] = _pss(proc)
            cpu = _cpu(proc)
            if cpu is not None:
                self._cpu_start[proc.pid] = cpu
        self._excluded_start = self._excluded_cpu()
        self._cpu_last = dict(self._cpu_start)
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def stop(self) -> Usage:
        """Take a last sample and return the usage since `start()`."""
        self._stop.set()
        self._thread.join()
        self._sample(final=True)
        end = self._excluded_cpu()
        self.usage.excluded_cpu_s = sum(end[p] - self._excluded_start.get(p, 0.0) for p in end)
        by_title: dict[str, float] = {}
        for pid, last in self._cpu_last.items():
            title = self._titles.get(pid, "?")
            by_title[title] = by_title.get(title, 0.0) + last - self._cpu_start.get(pid, 0.0)
        # The driver's CPU time includes the sampling thread's: not the pipeline's.
        by_title["driver"] = by_title.get("driver", 0.0) - self.usage.monitor_cpu_s
        self.usage.cpu_by_title = {t: round(v, 2) for t, v in
                                   sorted(by_title.items(), key=lambda kv: -kv[1]) if v >= 0.05}
        self.usage.cpu_seconds = sum(by_title.values())
        return self.usage


def parquet_complete(fs: object, path: str) -> bool:
    """True when `path` ends with Parquet's footer magic: the writer has closed it."""
    size = fs.size(path)  # type: ignore[attr-defined]
    if size < 12:
        return False
    tail: bytes = fs.cat_file(path, start=size - 4, end=size)  # type: ignore[attr-defined]
    return tail == b"PAR1"


def first_part_probe(output_url: str) -> Callable[[], bool]:
    """A check for "OUTPUT holds a complete, visible Parquet file" (any writer, any fsspec URL).

    Files under `_`/`.` names are writers' temporaries; a local file being written has no footer
    yet, and an object store shows an object only once its upload completed.
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(output_url)
    root = root.rstrip("/")

    def probe() -> bool:
        try:
            entries = fs.ls(root, detail=False, refresh=True) if not _is_local(fs) \
                else [f"{root}/{n}" for n in os.listdir(root)]
        except FileNotFoundError:
            return False
        for path in entries:
            name = path.rsplit("/", 1)[-1]
            if name.startswith(("_", ".")) or not name.endswith(".parquet"):
                continue
            if parquet_complete(fs, path):
                return True
        return False

    return probe


def _is_local(fs: object) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _proc_stat() -> tuple[float, float] | None:
    """(busy, total) CPU jiffies of the whole node since boot, from /proc/stat (Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already in user and nice
    return total - idle, total


class NodeCpu:
    """How busy the node's CPUs were over a span of wall-clock time, sampled every `interval`.

    Where a job's phase is host-bound, its node runs near 100%: the fix is less CPU work a row.
    Well below, with the GPU idle too, the pipeline's threads wait on each other instead.
    `busy(t0, t1)` takes epoch seconds (the manifest's `started_at`/`committed_at`).
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float, float]] = []  # (epoch, busy, total)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="node-cpu")

    def _take(self) -> None:
        stat = _proc_stat()
        if stat is not None:
            self.samples.append((time.time(), *stat))

    def _run(self) -> None:
        self._take()
        while not self._stop.wait(self.interval):
            self._take()

    def __enter__(self) -> NodeCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()

    def busy(self, t0: float, t1: float) -> float | None:
        """The fraction of all the node's CPU time that was busy between `t0` and `t1`."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return None
        (_, b0, n0), (_, b1, n1) = inside[0], inside[-1]
        return round((b1 - b0) / (n1 - n0), 3) if n1 > n0 else None
