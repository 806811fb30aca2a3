"""How a GPU actor's threads share its CPUs: the GIL's switch interval, and the priority of the
bulk host work (decoding, tokenizing) below the threads that feed the GPU.

An actor runs one thread that submits batches (ONNX Runtime's or TensorRT's launch, with the
GIL released), one that writes, and many that decode or tokenize, in threads and helper
processes, on as many CPUs as it has. Two things make the feeding thread wait while the GPU
drains:

- The GIL: a thread coming back from a call that released it (an engine's launch, a wait on
  a stream) waits until the holder gives it up, up to `sys.getswitchinterval()` (5 ms by
  default) when the holder is running Python code. The actor shortens the interval.
- The CPUs: decoding and tokenizing saturate every CPU in bursts, and the kernel shares a CPU
  fairly among runnable threads, so the feeding thread queues behind them. The bulk work runs
  at a lower priority (a higher nice value: Linux sets it per thread), so it takes the CPUs
  the feeding threads leave and never delays them.

Both can be set for a job through the driver's environment
(`TRT_BATCH_RUNNER_SWITCH_INTERVAL_MS`, `TRT_BATCH_RUNNER_HELPER_NICE`; 5 and 0 give Python's
and the kernel's defaults); the driver reads them (`from_env`) into the actors'
`WorkerConfig`, and each actor applies them (`configure`). So can the batches of images the
decoding threads work on at once (`TRT_BATCH_RUNNER_IMAGE_TABLES`, `image_tables_from_env`;
1 decodes one batch at a time).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

from workers.errors import SpecError

#: The GIL's switch interval in a GPU actor (Python's default is 5 ms).
SWITCH_INTERVAL_MS = 1.0
#: How much lower the decoding and tokenizing threads and processes run (nice increment).
HELPER_NICE = 5
#: Batches of images the CPU threads decode at once (`workers.preprocess.Preprocessor`): the
#: next batch's rows keep every thread busy while the last one's slowest chunk finishes.
IMAGE_TABLES = 2


def _env_number(name: str, default: float, low: float, high: float) -> float:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not low <= value <= high:
        raise SpecError(f"{name}={text!r} is not a number from {low:g} to {high:g}; unset it "
                        f"for the default ({default:g})")
    return value


def from_env() -> tuple[float, int]:
    """(switch interval in ms, nice increment) for a job's actors, from the driver's environment
    (`TRT_BATCH_RUNNER_SWITCH_INTERVAL_MS`, `TRT_BATCH_RUNNER_HELPER_NICE`), else the
    defaults; a bad value is a `SpecError` that names the variable."""
    return (_env_number("TRT_BATCH_RUNNER_SWITCH_INTERVAL_MS", SWITCH_INTERVAL_MS, 0.05, 100.0),
            int(_env_number("TRT_BATCH_RUNNER_HELPER_NICE", HELPER_NICE, 0, 19)))


def image_tables_from_env() -> int:
    """Batches of images an actor decodes at once (`TRT_BATCH_RUNNER_IMAGE_TABLES`, else
    `IMAGE_TABLES`); a bad value is a `SpecError` that names the variable."""
    return int(_env_number("TRT_BATCH_RUNNER_IMAGE_TABLES", IMAGE_TABLES, 1, 8))


_nice = HELPER_NICE


def configure(switch_interval_ms: float, nice: int) -> None:
    """In an actor, before its pools start: the GIL's switch interval, and the nice increment
    that `helper_nice` gives the decoding and tokenizing pools made afterwards."""
    global _nice
    sys.setswitchinterval(switch_interval_ms / 1000.0)
    _nice = nice


def helper_nice() -> int:
    """The nice increment of the bulk work in this process (`configure`; default `HELPER_NICE`)."""
    return _nice


def lower_this_thread(increment: int) -> None:
    """Raise the calling thread's nice value by `increment` (Linux: per thread; elsewhere the
    process's, where threads share it, so nothing is done). Never fails a job: a system that
    refuses only leaves the priority as it was."""
    if increment <= 0 or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + increment)


def lower_this_process(increment: int) -> None:
    """Raise the nice value of a helper process (its only working thread) by `increment`."""
    if increment <= 0:
        return
    with contextlib.suppress(OSError, AttributeError):
        os.nice(increment)
