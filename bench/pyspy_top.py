"""What each thread of a process was doing: py-spy's raw samples summarized per thread.

    py-spy record --pid PID --threads --idle --format raw -o RAW --duration 10
    python -m bench.pyspy_top RAW [RAW ...]

With `--idle` a waiting thread is sampled too, so each thread's lines add up to its share of
the time: a thread of the pipeline that spends 70% in `Condition.wait` under `take` waits for
a slot, one in `run_with_iobinding` is launching on the GPU, and so on. Each line is a leaf
frame with the frame of this repository's code nearest to it (where the wait is decided).
`record()` runs py-spy itself on the processes whose command line matches, for benchmarks.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

_THREAD = re.compile(r"^thread \((\d+)\): ?(.*)$")
_FRAME = re.compile(r"^(.*?) \((.*?)(?::\d+)?\)$")
_OURS = ("workers/", "jobs/", "bench/")


def _name(frame: str) -> tuple[str, str]:
    """(function, file) of a py-spy frame `func (path/file.py:123)`."""
    match = _FRAME.match(frame.strip())
    return (match.group(1), match.group(2)) if match else (frame.strip(), "")


def summarize(text: str, top: int = 6) -> str:
    """Per thread (busiest first): its samples, and its `top` leaf frames with their share."""
    threads: dict[str, Counter[str]] = defaultdict(Counter)
    totals: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        head = _THREAD.match(frames[0])
        if head is None:
            thread, frames = "all threads", frames
        else:
            thread, frames = f"{head.group(2) or 'thread'} ({head.group(1)})", frames[1:]
        count = int(count_text)
        totals[thread] += count
        leaf = _name(frames[-1])[0] if frames else "?"
        ours = next((f"{fn} ({Path(path).name})" for fn, path in map(_name, reversed(frames))
                     if any(part in path for part in _OURS)), "")
        threads[thread][f"{leaf} <- {ours}" if ours else leaf] += count
    lines = []
    for thread, total in totals.most_common():
        lines.append(f"{thread}: {total} samples")
        for what, count in threads[thread].most_common(top):
            lines.append(f"    {100 * count / total:5.1f}%  {what}")
    return "\n".join(lines)


def record(pattern: str, seconds: float, out: Path, rate: int = 100) -> str:
    """py-spy on each process whose command line contains `pattern`, all threads, idle ones
    included, for `seconds`; the summaries (or why there are none). Raw samples under `out`."""
    import psutil

    spy = shutil.which("py-spy")
    if spy is None:
        return "py-spy is not installed: no thread profile"
    pids = [p.pid for p in psutil.process_iter(["cmdline"])
            if pattern in " ".join(p.info["cmdline"] or [])]
    if not pids:
        return f"no process matches {pattern!r}: no thread profile"
    out.mkdir(parents=True, exist_ok=True)
    runs = [(pid, out / f"pyspy_{pid}.txt",
             subprocess.Popen([spy, "record", "--pid", str(pid), "--duration",
                               str(max(1, round(seconds))), "--rate", str(rate), "--threads",
                               "--idle", "--nonblocking", "--format", "raw", "-o",
                               str(out / f"pyspy_{pid}.txt")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
            for pid in pids]
    parts = []
    for pid, path, proc in runs:
        _, err = proc.communicate()
        if proc.returncode != 0 or not path.exists():
            parts.append(f"== pid {pid}: py-spy failed ({proc.returncode}): {err.strip()[-300:]}")
            continue
        parts.append(f"== pid {pid}, {seconds:.0f} s at {rate} Hz\n{summarize(path.read_text())}")
    return "\n".join(parts)


class RecordLater:
    """`record(pattern, seconds, out)` on a thread, `at` seconds from now (None: never);
    `result()` waits for it and returns its summary ("" when it did not run)."""

    def __init__(self, at: float | None, seconds: float, out: Path,
                 pattern: str = "ShardWorker") -> None:
        import threading

        self.summary = ""
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        if at is not None:
            def run() -> None:
                if not self._cancel.wait(at):
                    self.summary = record(pattern, seconds, out)
            self._thread = threading.Thread(target=run, daemon=True, name="py-spy-later")
            self._thread.start()

    def result(self) -> str:
        self._cancel.set()  # the process ended before `at`: nothing to record
        if self._thread is not None:
            self._thread.join()
        return self.summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", nargs="+", type=Path, help="py-spy record --format raw files")
    parser.add_argument("--top", type=int, default=6, help="leaf frames shown per thread")
    args = parser.parse_args()
    for path in args.raw:
        print(f"== {path}\n{summarize(path.read_text(), args.top)}")


if __name__ == "__main__":
    main()
