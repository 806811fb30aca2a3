"""The CUDA layer on cuda-python: devices, streams, events, pinned host and device buffers.

Every call's status goes through `check`, which turns a failure into `CudaError` naming the call
and CUDA's own error name and text. Each resource class owns exactly one CUDA object and frees it
in `close()` (idempotent; also a context manager); whoever created it closes it.

`cuda.bindings` is imported on first use, so this module imports on machines without cuda-python.
"""

from __future__ import annotations

import ctypes
import math
from types import TracebackType
from typing import Any, TypeVar

import numpy as np

from workers.errors import BackendError, MissingDependencyError

_runtime: Any = None
_Self = TypeVar("_Self", bound="_Resource")


class CudaError(BackendError):
    """A CUDA runtime or driver call failed; the message names the call and CUDA's error."""

    def __init__(self, message: str, code: int = -1) -> None:
        super().__init__(message)
        self.code = code


def runtime() -> Any:
    """The `cuda.bindings.runtime` module, imported once; MissingDependencyError if absent."""
    global _runtime
    if _runtime is None:
        try:
            from cuda.bindings import runtime as rt
        except ImportError as exc:
            raise MissingDependencyError(
                "cuda-python is not installed; pip install 'cuda-python>=12.6' "
                "(or pip install '.[gpu]'), or run on the CPU"
            ) from exc
        _runtime = rt
    return _runtime


def _error_text(status: Any) -> str:
    """`cudaErrorX (text)` for a runtime status, `CUDA_ERROR_X (text)` for a driver one."""
    name = getattr(status, "name", str(status))
    try:
        if type(status).__name__ == "cudaError_t":
            rt = runtime()
            _, text = rt.cudaGetErrorString(status)
        else:
            from cuda.bindings import driver

            _, text = driver.cuGetErrorString(status)
        detail = text.decode() if isinstance(text, bytes) else str(text)
    except Exception:  # the text is a nicety; never hide the original failure behind another
        detail = ""
    return f"{name} ({detail})" if detail else name


def check(result: Any, what: str = "CUDA call") -> Any:
    """Raise CudaError unless a cuda-python call's `(status, *values)` result succeeded.

    Returns None for a bare status, the value for `(status, value)`, else the tuple of values.
    """
    if isinstance(result, tuple):
        status, values = result[0], result[1:]
    else:
        status, values = result, ()
    if int(status) != 0:
        raise CudaError(f"{what} failed: {_error_text(status)}", code=int(status))
    if not values:
        return None
    return values[0] if len(values) == 1 else values


# Statuses that mean "no usable GPU here" rather than a broken call.
_NO_GPU = ("cudaErrorNoDevice", "cudaErrorInsufficientDriver", "cudaErrorInitializationError",
           "cudaErrorSystemDriverMismatch", "cudaErrorCompatNotSupportedOnDevice")
# Of those, the ones a driver older than the CUDA runtime also gives.
_DRIVER_TOO_OLD = ("cudaErrorInsufficientDriver", "cudaErrorSystemDriverMismatch",
                   "cudaErrorCompatNotSupportedOnDevice")


def driver_mismatch(runtime_version: int, driver_version: int) -> str | None:
    """What to tell a user whose driver cannot run the CUDA runtime cuda-python loads.

    Versions as CUDA encodes them (12040 = 12.4). None when there is no driver at all (0: no
    GPU here) or the driver is new enough.
    """
    if driver_version <= 0 or driver_version >= runtime_version:
        return None

    def text(v: int) -> str:
        return f"{v // 1000}.{v % 1000 // 10}"

    driver_major = driver_version // 1000
    return (f"the NVIDIA driver supports CUDA up to {text(driver_version)}, and cuda-python "
            f"loads the CUDA {text(runtime_version)} runtime; install the packages for CUDA "
            f"{driver_major} (pip install '.[tensorrt-cu{driver_major}]' or "
            f"'cuda-python>={driver_major},<{driver_major + 1}'), or update the driver")


def device_count() -> int:
    """How many CUDA devices this process sees; 0 without a driver, a GPU or cuda-python.

    A driver too old for the CUDA runtime is not "no GPU": it raises CudaError naming both
    versions and the packages to install.
    """
    try:
        rt = runtime()
    except MissingDependencyError:
        return 0
    status, count = rt.cudaGetDeviceCount()
    name = getattr(status, "name", "")
    if name in _DRIVER_TOO_OLD:
        driver = rt.cudaDriverGetVersion()
        runtime_version = rt.cudaRuntimeGetVersion()
        if int(driver[0]) == 0 and int(runtime_version[0]) == 0:
            problem = driver_mismatch(int(runtime_version[1]), int(driver[1]))
            if problem:
                raise CudaError(f"cudaGetDeviceCount failed: {_error_text(status)}: {problem}",
                                code=int(status))
    if name in _NO_GPU:
        return 0
    check((status,), "cudaGetDeviceCount")
    return int(count)


def _check_device(device: int) -> None:
    count = device_count()
    if not 0 <= device < count:
        raise CudaError(f"CUDA device {device} does not exist: this process sees {count} "
                        "device(s); check CUDA_VISIBLE_DEVICES and the backend's device_id")


def set_device(device: int) -> None:
    """Make `device` current for the calling thread (CUDA's current device is per thread)."""
    _check_device(device)
    check(runtime().cudaSetDevice(device), f"cudaSetDevice({device})")


def current_device() -> int:
    """The calling thread's current CUDA device."""
    return int(check(runtime().cudaGetDevice(), "cudaGetDevice"))


def compute_capability(device: int = 0) -> tuple[int, int]:
    """`(major, minor)` compute capability of `device`, e.g. (9, 0) for an H100."""
    _check_device(device)
    rt = runtime()
    attr = rt.cudaDeviceAttr
    major = check(rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device),
                  "cudaDeviceGetAttribute(major)")
    minor = check(rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device),
                  "cudaDeviceGetAttribute(minor)")
    return int(major), int(minor)


def device_name(device: int = 0) -> str:
    """The device's marketing name, e.g. 'NVIDIA H100 80GB HBM3'."""
    _check_device(device)
    props = check(runtime().cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name
    return (name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)).strip()


def memory_info() -> tuple[int, int]:
    """`(free, total)` bytes of the current device's memory."""
    free, total = check(runtime().cudaMemGetInfo(), "cudaMemGetInfo")
    return int(free), int(total)


def driver_version() -> int:
    """The CUDA driver's version as CUDA encodes it (e.g. 13000 for 13.0); 0 without a driver."""
    status, version = runtime().cudaDriverGetVersion()
    return int(version) if int(status) == 0 else 0


class _Resource:
    """One CUDA object with one owner: `close()` frees it once; usable as a context manager."""

    _closed = True

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._free()

    def _free(self) -> None:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        return self._closed

    def _require_open(self) -> None:
        if self._closed:
            raise CudaError(f"{type(self).__name__} is closed; it cannot be used after close()")

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Stream(_Resource):
    """A non-blocking CUDA stream on the current device (no implicit sync with the legacy stream).

    `high_priority`: the device's greatest stream priority, so the GPU's block scheduler starts
    this stream's kernels before those of default-priority streams queued beside them (it does
    not preempt blocks already running).
    """

    def __init__(self, high_priority: bool = False) -> None:
        rt = runtime()
        if high_priority:
            _least, greatest = check(rt.cudaDeviceGetStreamPriorityRange(),
                                     "cudaDeviceGetStreamPriorityRange")
            self._stream = check(rt.cudaStreamCreateWithPriority(rt.cudaStreamNonBlocking,
                                                                 greatest),
                                 "cudaStreamCreateWithPriority")
        else:
            self._stream = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking),
                                 "cudaStreamCreateWithFlags")
        self._closed = False

    @property
    def priority(self) -> int:
        """The stream's priority (lower numbers run first; 0 is the default)."""
        self._require_open()
        return int(check(runtime().cudaStreamGetPriority(self._stream), "cudaStreamGetPriority"))

    @property
    def handle(self) -> int:
        """The `cudaStream_t` as an integer, for TensorRT, ONNX Runtime and the copy helpers."""
        self._require_open()
        return int(self._stream)

    def synchronize(self) -> None:
        """Block until everything enqueued on the stream so far is done."""
        self._require_open()
        check(runtime().cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def wait_event(self, event: Event) -> None:
        """Make later work on this stream wait for `event` (without blocking the host)."""
        self._require_open()
        check(runtime().cudaStreamWaitEvent(self._stream, event.raw, 0), "cudaStreamWaitEvent")

    def _free(self) -> None:
        check(runtime().cudaStreamDestroy(self._stream), "cudaStreamDestroy")


def _stream_handle(stream: Stream | int) -> int:
    return stream.handle if isinstance(stream, Stream) else int(stream)


class Event(_Resource):
    """A CUDA event; `timing=True` lets `elapsed_ms` measure between two recorded events.

    Events are created with blocking sync, so `synchronize()` sleeps the host thread instead of
    spinning a core the reader and writer threads need.
    """

    def __init__(self, timing: bool = False) -> None:
        rt = runtime()
        flags = rt.cudaEventBlockingSync
        if not timing:
            flags |= rt.cudaEventDisableTiming
        self._event = check(rt.cudaEventCreateWithFlags(flags), "cudaEventCreateWithFlags")
        self.timing = timing
        self._closed = False

    @property
    def raw(self) -> Any:
        """The `cudaEvent_t` object."""
        self._require_open()
        return self._event

    @property
    def handle(self) -> int:
        """The `cudaEvent_t` as an integer."""
        return int(self.raw)

    def record(self, stream: Stream | int) -> None:
        """Record the event at the current end of `stream`'s work."""
        self._require_open()
        check(runtime().cudaEventRecord(self._event, _stream_handle(stream)), "cudaEventRecord")

    def synchronize(self) -> None:
        """Block until the work before the last `record` is done."""
        self._require_open()
        check(runtime().cudaEventSynchronize(self._event), "cudaEventSynchronize")

    def query(self) -> bool:
        """True when the work before the last `record` is done (never blocks)."""
        self._require_open()
        rt = runtime()
        status = rt.cudaEventQuery(self._event)[0]
        if status == rt.cudaError_t.cudaErrorNotReady:
            return False
        check((status,), "cudaEventQuery")
        return True

    def _free(self) -> None:
        check(runtime().cudaEventDestroy(self._event), "cudaEventDestroy")


def elapsed_ms(start: Event, end: Event) -> float:
    """Milliseconds between two recorded, completed timing events."""
    return float(check(runtime().cudaEventElapsedTime(start.raw, end.raw), "cudaEventElapsedTime"))


class DeviceBuffer(_Resource):
    """`nbytes` of device memory on the current device (cudaMalloc: plain, not managed)."""

    def __init__(self, nbytes: int) -> None:
        if nbytes <= 0:
            raise ValueError(f"DeviceBuffer needs a positive size, got {nbytes} bytes")
        self.nbytes = int(nbytes)
        try:
            self._ptr = int(check(runtime().cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})"))
        except CudaError as exc:
            raise CudaError(f"{exc}; lower the batch size or the slots in flight",
                            code=exc.code) from exc
        self._closed = False

    @property
    def ptr(self) -> int:
        """The device address."""
        self._require_open()
        return self._ptr

    def memset_async(self, value: int, stream: Stream | int, nbytes: int | None = None) -> None:
        """Fill the first `nbytes` (default all) bytes with `value` on `stream`."""
        self._require_open()
        count = self.nbytes if nbytes is None else nbytes
        check(runtime().cudaMemsetAsync(self._ptr, value, count, _stream_handle(stream)),
              "cudaMemsetAsync")

    def _free(self) -> None:
        check(runtime().cudaFree(self._ptr), "cudaFree")


class PinnedBuffer(_Resource):
    """`nbytes` of page-locked host memory, so copies to and from the GPU run asynchronously.

    Views returned by `view` alias this memory: they are invalid once the buffer is closed.
    """

    def __init__(self, nbytes: int) -> None:
        if nbytes <= 0:
            raise ValueError(f"PinnedBuffer needs a positive size, got {nbytes} bytes")
        self.nbytes = int(nbytes)
        rt = runtime()
        # Portable: pinned for every device, so a slot on device 1 can still copy from it.
        self._ptr = int(check(rt.cudaHostAlloc(self.nbytes, rt.cudaHostAllocPortable),
                              f"cudaHostAlloc({self.nbytes})"))
        self._memory = (ctypes.c_byte * self.nbytes).from_address(self._ptr)
        self._closed = False

    @property
    def ptr(self) -> int:
        """The host address."""
        self._require_open()
        return self._ptr

    def view(self, dtype: np.dtype[Any] | type | str, shape: tuple[int, ...]) -> np.ndarray:
        """A numpy array of `dtype` and `shape` over the start of the buffer (no copy)."""
        self._require_open()
        dtype = np.dtype(dtype)
        count = math.prod(shape)
        if count * dtype.itemsize > self.nbytes:
            raise ValueError(f"a {dtype.name} view of shape {list(shape)} needs "
                             f"{count * dtype.itemsize} bytes; the pinned buffer has {self.nbytes}")
        return np.frombuffer(memoryview(self._memory), dtype=dtype, count=count).reshape(shape)

    def _free(self) -> None:
        check(runtime().cudaFreeHost(self._ptr), "cudaFreeHost")


def copy_htod_async(dst_ptr: int, src_ptr: int, nbytes: int, stream: Stream | int) -> None:
    """Enqueue a host-to-device copy on `stream`; async only when the host memory is pinned."""
    rt = runtime()
    check(rt.cudaMemcpyAsync(dst_ptr, src_ptr, nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                             _stream_handle(stream)), "cudaMemcpyAsync(host to device)")


def copy_dtoh_async(dst_ptr: int, src_ptr: int, nbytes: int, stream: Stream | int) -> None:
    """Enqueue a device-to-host copy on `stream`; async only when the host memory is pinned."""
    rt = runtime()
    check(rt.cudaMemcpyAsync(dst_ptr, src_ptr, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                             _stream_handle(stream)), "cudaMemcpyAsync(device to host)")


def copy_dtod_async(dst_ptr: int, src_ptr: int, nbytes: int, stream: Stream | int) -> None:
    """Enqueue a device-to-device copy on `stream`."""
    rt = runtime()
    check(rt.cudaMemcpyAsync(dst_ptr, src_ptr, nbytes,
                             rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                             _stream_handle(stream)), "cudaMemcpyAsync(device to device)")


class SlotTimer(_Resource):
    """Four timing events around one batch on a stream: start, copied in, executed, copied out.

    A slot marks them in order with `mark(0..3, stream)`; once the batch is done (the last
    event completed), `stage_seconds` and `compute_span` read them.
    """

    STAGES = ("h2d", "compute", "d2h")

    def __init__(self) -> None:
        self._events: list[Event] = []
        try:
            for _ in range(4):
                self._events.append(Event(timing=True))
        except BaseException:
            for event in self._events:
                event.close()
            raise
        self._closed = False

    @property
    def done(self) -> Event:
        """The last event: recorded after the copy-out, so it completes with the batch."""
        self._require_open()
        return self._events[3]

    @property
    def executed(self) -> Event:
        """Event 2: recorded after the execution, before the copy-out."""
        self._require_open()
        return self._events[2]

    def mark(self, index: int, stream: Stream | int) -> None:
        """Record event `index` (0 start, 1 copied in, 2 executed, 3 copied out) on `stream`."""
        self._require_open()
        self._events[index].record(stream)

    def stage_seconds(self) -> dict[str, float]:
        """Seconds in h2d, compute and d2h for the last batch (which must be done)."""
        self._require_open()
        ev = self._events
        return {stage: elapsed_ms(ev[i], ev[i + 1]) / 1e3 for i, stage in enumerate(self.STAGES)}

    def compute_span(self, clock: Event) -> tuple[float, float]:
        """Start and end of the last batch's execution, in seconds after the `clock` event."""
        self._require_open()
        return elapsed_ms(clock, self._events[1]) / 1e3, elapsed_ms(clock, self._events[2]) / 1e3

    def _free(self) -> None:
        for event in self._events:
            event.close()
