"""Sampling profiles of a benchmark run with py-spy: every Ray worker of this process tree.

`py-spy record --format raw` writes collapsed stacks (`frame;frame;... count`); this module
starts one recorder per Ray worker process (actors and task workers), stops them when the run
ends, and sums the samples by process title and by where the time went.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections import Counter
from collections.abc import Iterable

import psutil

# Ray's own service processes: nothing of the pipeline runs in them.
_SKIP_TITLES = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def py_spy() -> str:
    """Path of the py-spy executable, or an error that says how to install it."""
    path = shutil.which("py-spy")
    if path is None:
        raise RuntimeError("py-spy is not installed; pip install py-spy (needed by --profile)")
    return path


def _title(proc: psutil.Process) -> str:
    try:
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""
    return cmdline[0] if cmdline else ""


class Profiler:
    """Records this driver and every busy `ray::` worker under it (except `exclude`) until `stop()`.

    A worker is recorded from the first `poll()` that sees it doing something (its title is
    not `ray::IDLE`): actors from their start, pooled task workers from their first task.
    The benchmark's monitor calls `poll()` on each sample.
    """

    def __init__(self, directory: str, name: str, exclude: Iterable[int] = (),
                 rate: int = 50) -> None:
        self.exe = py_spy()
        self.directory = directory
        self.name = name
        self.exclude = set(exclude)
        self.rate = rate
        self.recorders: dict[int, tuple[subprocess.Popen[bytes], str, str]] = {}
        os.makedirs(directory, exist_ok=True)
        self._record(os.getpid(), "driver")

    def _record(self, pid: int, title: str) -> None:
        out = os.path.join(self.directory, f"{self.name}-{pid}.txt")
        recorder = subprocess.Popen(
            [self.exe, "record", "--pid", str(pid), "--rate", str(self.rate), "--format", "raw",
             "--nonblocking", "--output", out],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.recorders[pid] = (recorder, out, title)

    def poll(self) -> None:
        """Start a recorder for each busy worker process not yet recorded."""
        for proc in psutil.Process(os.getpid()).children(recursive=True):
            if proc.pid in self.recorders or proc.pid in self.exclude:
                continue
            title = _title(proc)
            if (not title.startswith("ray::") or title.startswith(_SKIP_TITLES)
                    or title == "ray::IDLE"):
                continue
            self._record(proc.pid, title)

    def stop(self) -> dict[str, Counter[str]]:
        """Stop every recorder (it writes its file on SIGINT); stacks summed per process title."""
        for pid, (recorder, _, _) in self.recorders.items():
            if pid != os.getpid() and recorder.poll() is None:
                recorder.send_signal(signal.SIGINT)
        own = self.recorders.get(os.getpid())
        if own is not None and own[0].poll() is None:
            own[0].send_signal(signal.SIGINT)
        stacks: dict[str, Counter[str]] = {}
        for recorder, out, title in self.recorders.values():
            try:
                recorder.wait(timeout=30)
            except subprocess.TimeoutExpired:
                recorder.kill()
                recorder.wait()
            # Actor methods and tasks retitle the process ("ray::ShardWorker.process"): group
            # by what comes before the method.
            key = title.split(" ")[0].split(".")[0]
            counter = stacks.setdefault(key, Counter())
            if os.path.exists(out):
                with open(out) as f:
                    for line in f:
                        stack, _, count = line.rstrip("\n").rpartition(" ")
                        if stack and count.isdigit():
                            counter[stack] += int(count)
        return stacks


# Where a sample's time went, by the first matching frame from the leaf up.
CATEGORIES = (
    ("infer", ("onnxruntime",)),
    ("parquet read", ("workers/reader.py", "workers/rowgroups.py", "iter_batches",
                      "read_row_group", "ParquetFile", "_read_parquet", "read_table",
                      "parquet_datasource", "datasource", "ReadFiles")),
    ("parquet write", ("workers/commit.py", "ParquetWriter", "write_table", "parquet_datasink",
                       "datasink", "write_dataset")),
    ("convert", ("workers/convert.py", "output_table", "block_accessor", "arrow_block",
                 "numpy_support", "tensor_extensions", "to_numpy", "from_numpy", "batcher",
                 "_format_batches", "convert_")),
    ("storage i/o", ("s3fs", "fsspec", "aiohttp", "botocore", "ssl.py", "socket")),
    ("object store / rpc", ("ray/_private/worker.py", "serialization", "_raylet",
                            "object_ref", "core_worker")),
)


# Leaves where a thread only waits (for work, a queue, a lock or a socket).
_WAITING = ("main_loop", "Condition.wait", "Event.wait", "_wait_for_tstate_lock", "select ",
            "epoll", "Queue.get", "Future.result", "sleep")


def categorize(stack: str) -> str:
    """The category of one collapsed stack (frames joined by ';', root first)."""
    frames = stack.split(";")
    if any(w in frames[-1] for w in _WAITING):
        return "waiting"
    for frame in reversed(frames):
        for category, needles in CATEGORIES:
            if any(n in frame for n in needles):
                return category
    return "other"


def summary(stacks: dict[str, Counter[str]], top: int = 8) -> str:
    """Samples per process title: share by category, then the hottest leaf frames."""
    lines = []
    for title, counter in sorted(stacks.items()):
        total = sum(counter.values())
        if not total:
            continue
        by_category: Counter[str] = Counter()
        leaves: Counter[str] = Counter()
        for stack, count in counter.items():
            by_category[categorize(stack)] += count
            leaves[stack.split(";")[-1]] += count
        lines.append(f"{title}: {total} samples; " + ", ".join(
            f"{c} {100 * n / total:.0f}%" for c, n in by_category.most_common()))
        for leaf, count in leaves.most_common(top):
            lines.append(f"    {100 * count / total:5.1f}%  {leaf}")
    return "\n".join(lines)
