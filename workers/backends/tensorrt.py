"""TensorRT backend: deserialize a plan once, run batches with `execute_async_v3` on CUDA streams.

The model bytes are a plan (built by `workers.plan_build`). Tensors are found by name from the
engine; every batch sets its input shapes, then reads the output shapes TensorRT derives from
them. Memory and streams come from `workers.cuda` (cuda-python), every status checked. The
synchronous `infer` runs on one stream; `open_slot` gives the GPU pipeline independent slots
(own execution context, stream, pinned and device buffers) to keep several batches in flight.
Runs with the full `tensorrt` package, or with only `tensorrt_lean`/`tensorrt_dispatch` for
version-compatible plans.
"""

from __future__ import annotations

import importlib
import math
import sys
import tempfile
import threading
import weakref
from collections import deque
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from workers.backends.base import Backend, Batch, DeviceSlot, Shapes
from workers.errors import BackendError, MissingDependencyError
from workers.plugins import local_plugin_files, register_tensorrt_plugins
from workers.tensors import TensorMeta

if TYPE_CHECKING:
    import tensorrt as trt

# The extra of the CUDA major the node's driver runs (a CUDA 12 driver cannot run CUDA 13 builds).
_EXTRAS = "'.[tensorrt-cu12]' or '.[tensorrt-cu13]'"
INSTALL_HINT = (f"pip install {_EXTRAS} on the GPU nodes (tensorrt-lean is enough to run "
                "version-compatible plans), or set backend: onnxruntime")
# numpy has no bfloat16/fp8; ml_dtypes (an onnx dependency) provides them.
_ML_DTYPES = {"BF16": "bfloat16", "FP8": "float8_e4m3fn"}
_NUMPY_NAMES = {"FLOAT": "float32", "HALF": "float16", "INT8": "int8", "INT32": "int32",
                "INT64": "int64", "BOOL": "bool", "UINT8": "uint8"}


def import_tensorrt(builder: bool = False) -> ModuleType:
    """The TensorRT module: `tensorrt`, else (to run plans only) `tensorrt_lean`/`tensorrt_dispatch`.

    Tests for a real attribute: the type stubs alone make `import tensorrt` succeed as an empty
    namespace package.
    """
    names = ("tensorrt",) if builder else ("tensorrt", "tensorrt_lean", "tensorrt_dispatch")
    wanted = "Builder" if builder else "Runtime"
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, wanted):
            return module
    if builder:
        lean = [n for n in ("tensorrt_lean", "tensorrt_dispatch") if _importable(n)]
        extra = (f" ({lean[0]} is installed: it runs plans but cannot build them)" if lean else "")
        raise MissingDependencyError(
            f"TensorRT is not installed{extra}; building a plan needs the full package: "
            f"pip install {_EXTRAS} on the node that builds, or set backend: onnxruntime")
    raise MissingDependencyError(f"TensorRT is not installed; {INSTALL_HINT}")


def _importable(name: str) -> bool:
    try:
        module = importlib.import_module(name)
    except ImportError:
        return False
    return hasattr(module, "Runtime")


def import_cuda() -> ModuleType:
    """`workers.cuda`, whose cuda-python import says how to install it when missing."""
    try:
        from workers import cuda
    except ImportError as exc:
        raise MissingDependencyError(
            f"cuda-python is not installed ({exc}); pip install {_EXTRAS}") from exc
    return cuda


def numpy_dtype(trt_module: Any, dtype: Any, tensor: str = "") -> np.dtype:
    """The numpy dtype of a TensorRT DataType; bf16/fp8 through ml_dtypes, where numpy has none."""
    nptype = getattr(trt_module, "nptype", None)  # the lean/dispatch modules may lack the helper
    if nptype is not None:
        try:
            return np.dtype(nptype(dtype))
        except (TypeError, KeyError, ValueError):
            pass
    name = str(getattr(dtype, "name", dtype)).rsplit(".", 1)[-1]
    if name in _NUMPY_NAMES:
        return np.dtype(_NUMPY_NAMES[name])
    if name in _ML_DTYPES:
        try:
            import ml_dtypes
        except ImportError as exc:
            raise MissingDependencyError(f"tensor '{tensor}' is {name}; reading it needs "
                                         "ml_dtypes: pip install ml_dtypes") from exc
        return np.dtype(getattr(ml_dtypes, _ML_DTYPES[name]))
    raise BackendError(f"tensor '{tensor}' has TensorRT type {name}, which numpy cannot hold; "
                       "make the model's inputs and outputs float, int or bool (cast inside it)")


class LogCapture:
    """The TensorRT errors and warnings logged while this capture was open.

    Each build and each loaded backend holds one, so its messages name its own failure even
    though every TensorRT object of the process logs through the one `ProcessLogger`.
    """

    def __init__(self, owner: ProcessLogger) -> None:
        self._owner = owner
        self.errors: deque[str] = deque(maxlen=_KEPT_MESSAGES)
        self.warnings: list[str] = []

    def last_errors(self, count: int = 3) -> str:
        return "; ".join(list(self.errors)[-count:]) or "no error was logged"

    def close(self) -> None:
        self._owner._captures.discard(self)

    def __enter__(self) -> LogCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ProcessLogger:
    """This process's one TensorRT logger; `capture()` collects messages for one build or load.

    TensorRT keeps the logger of the first Builder or Runtime a process creates and ignores
    every later one, so a logger per object would leave all but the first empty. Messages go to
    every open capture (two builds at once in one process each see both: a name in a message
    says whose it is) and are echoed to stderr from `echo_level` up (WARNING unless changed,
    e.g. by `python -m jobs.plan build -v/-q`).
    """

    def __init__(self, trt_module: Any) -> None:
        self._trt = trt_module
        self._captures: weakref.WeakSet[LogCapture] = weakref.WeakSet()
        self._lock = threading.Lock()
        self.echo_level = int(trt_module.ILogger.WARNING)
        owner = self

        class _Logger(trt_module.ILogger):
            def __init__(self) -> None:
                trt_module.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                owner._log(int(severity), msg)

        # Kept alive here: TensorRT holds only a raw pointer to it.
        self.trt_logger = _Logger()

    def capture(self) -> LogCapture:
        capture = LogCapture(self)
        with self._lock:
            self._captures.add(capture)
        return capture

    def _log(self, level: int, msg: str) -> None:
        errors = level <= int(self._trt.ILogger.ERROR)
        warning = level == int(self._trt.ILogger.WARNING)
        if errors or warning:
            with self._lock:
                captures = list(self._captures)
            for capture in captures:
                (capture.errors.append if errors else capture.warnings.append)(msg)
        if level <= self.echo_level:
            print(f"[TensorRT] {msg}", file=sys.stderr, flush=True)


_KEPT_MESSAGES = 50
_process_loggers: dict[str, ProcessLogger] = {}
_process_loggers_lock = threading.Lock()


def process_logger(trt_module: Any) -> ProcessLogger:
    """The process's TensorRT logger for `trt_module`, created on first use (see ProcessLogger)."""
    with _process_loggers_lock:
        logger = _process_loggers.get(trt_module.__name__)
        if logger is None:
            logger = _process_loggers[trt_module.__name__] = ProcessLogger(trt_module)
        return logger


def choose_profile(profiles: Sequence[tuple[int, int]], rows: int) -> tuple[int, int]:
    """(optimization profile, rows to execute) for a batch of `rows`.

    `profiles` are the (min, max) batch rows of each profile. The first whose range holds
    `rows` wins; a batch below every minimum runs padded to the nearest minimum (its extra rows
    are computed and dropped).
    """
    for index, (lo, hi) in enumerate(profiles):
        if lo <= rows <= hi:
            return index, rows
    above = [(lo, index) for index, (lo, _) in enumerate(profiles) if lo > rows]
    if not above:
        raise BackendError(f"a batch of {rows} rows is larger than every optimization profile of "
                           f"the plan (batch rows {[list(p) for p in profiles]}); lower "
                           "--batch-size or rebuild the plan")
    lo, index = min(above)
    return index, lo


def _shape(dims: trt.Dims) -> tuple[int, ...]:
    return tuple(int(dims[i]) for i in range(len(dims)))


#: Per optimization profile, each dynamic input's (min, max) shape.
ProfileRanges = list[dict[str, tuple[tuple[int, ...], tuple[int, ...]]]]


def pick_profile(ranges: ProfileRanges, shapes: Shapes, prefer: int = 0) -> int | None:
    """The optimization profile whose ranges hold every input of `shapes` (`prefer` first, so
    a context switches only when it must), or None when none does."""
    def holds(index: int) -> bool:
        for name, (low, high) in ranges[index].items():
            shape = shapes.get(name)
            if shape is None or len(shape) != len(low) or any(
                    not lo <= d <= hi for d, lo, hi in zip(shape, low, high, strict=True)):
                return False
        return True

    order = [prefer, *(i for i in range(len(ranges)) if i != prefer)] if ranges else []
    return next((i for i in order if i < len(ranges) and holds(i)), None)


class TensorRTBackend(Backend):
    """Runs a TensorRT plan on one GPU; `model` is the plan's bytes."""

    name: ClassVar[str] = "tensorrt"
    supports_slots: ClassVar[bool] = True
    device = "cuda"

    def _load(self) -> tuple[tuple[TensorMeta, ...], tuple[TensorMeta, ...]]:
        trt_module = import_tensorrt()
        cuda = import_cuda()
        if cuda.device_count() < 1:
            raise BackendError("the TensorRT backend needs a CUDA GPU, and none is visible to this "
                               "worker; run it on a GPU node or set backend: onnxruntime")
        cuda.set_device(self.config.device_id)
        self._trt = trt_module
        self._cuda = cuda
        logger = process_logger(trt_module)
        self._logger = logger.capture()
        self._plugin_dir = tempfile.TemporaryDirectory(prefix="trt-plugins-")
        # Before deserializing: the plan's plugin layers need their creators registered (the
        # standard ones always; --plugins libraries unless the plan carries them itself).
        files = ([] if self.config.plugins_in_plan else
                 local_plugin_files(self.config.plugins, self.config.storage_options,
                                    self._plugin_dir.name))
        self._plugin_handles = register_tensorrt_plugins(trt_module, logger.trt_logger, files)
        runtime: trt.Runtime = trt_module.Runtime(logger.trt_logger)
        if self.config.engine_host_code_allowed and hasattr(runtime, "engine_host_code_allowed"):
            # Version-compatible plans carry the lean runtime as host code, which runs in this
            # process. The driver sets this only for plans it trusts: built by this run, or
            # signed with the job's plan key (jobs/plan_share.py, jobs/plan_signing.py).
            runtime.engine_host_code_allowed = True
        self._runtime = runtime
        engine: trt.ICudaEngine | None = runtime.deserialize_cuda_engine(self._model)
        if engine is None:
            version = getattr(trt_module, "__version__", "unknown")
            raise BackendError(
                f"{trt_module.__name__} {version} could not deserialize the plan "
                f"({self._logger.last_errors()}); a plan loads only on the TensorRT version and "
                "GPU compute capability that built it (unless built --version-compatible / "
                "--hardware-compatible; a version-compatible plan with the lean runtime inside "
                "also needs engine_host_code_allowed): rebuild it for this node")
        self.engine = engine
        inputs, outputs = self._describe(engine)
        self._profiles, self._fixed_batch = self._batch_limits(engine, inputs)
        self._max_rows = max(hi for _, hi in self._profiles)
        self._sync: TensorRTSlot | None = None
        self._slots: weakref.WeakSet[TensorRTSlot] = weakref.WeakSet()
        return inputs, outputs

    def _describe(self, engine: trt.ICudaEngine
                  ) -> tuple[tuple[TensorMeta, ...], tuple[TensorMeta, ...]]:
        trt_module = self._trt
        inputs: list[TensorMeta] = []
        outputs: list[TensorMeta] = []
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            if engine.get_tensor_location(name) != trt_module.TensorLocation.DEVICE:
                raise BackendError(f"plan tensor '{name}' lives in host memory (a shape tensor); "
                                   "the runner feeds only device tensors: export the model "
                                   "without shape inputs/outputs")
            shape = tuple(None if d < 0 else d for d in _shape(engine.get_tensor_shape(name)))
            if not shape:
                raise BackendError(f"plan tensor '{name}' is a scalar; every input and output "
                                   "needs a leading batch dimension")
            meta = TensorMeta(name, numpy_dtype(trt_module, engine.get_tensor_dtype(name), name),
                              shape)
            mode = engine.get_tensor_mode(name)
            if mode == trt_module.TensorIOMode.INPUT:
                # Dynamic dims beyond the batch (token widths) are set per batch, within the
                # plan's optimization profiles.
                inputs.append(meta)
            elif mode == trt_module.TensorIOMode.OUTPUT:
                outputs.append(meta)
        return tuple(inputs), tuple(outputs)

    @staticmethod
    def _batch_limits(engine: trt.ICudaEngine, inputs: tuple[TensorMeta, ...]
                      ) -> tuple[tuple[tuple[int, int], ...], int | None]:
        """((min, max) batch rows of each optimization profile, fixed batch of a static plan).

        A profile's range is what every dynamic input accepts in it (the intersection).
        """
        dynamic = [m for m in inputs if m.shape[0] is None]
        if not dynamic:
            fixed = int(inputs[0].shape[0] or 1) if inputs else 1
            return ((fixed, fixed),), fixed
        profiles = []
        for index in range(engine.num_optimization_profiles):
            shapes = [engine.get_tensor_profile_shape(m.name, index) for m in dynamic]
            profiles.append((max(int(s[0][0]) for s in shapes), min(int(s[2][0]) for s in shapes)))
        return tuple(profiles), None

    def profile_ranges(self) -> ProfileRanges:
        """Per optimization profile, each dynamic input's (min, max) shape."""
        self._require_loaded()
        engine = self.engine
        return [{m.name: (_shape(engine.get_tensor_profile_shape(m.name, p)[0]),
                          _shape(engine.get_tensor_profile_shape(m.name, p)[2]))
                 for m in self.inputs if any(d is None for d in m.shape)}
                for p in range(engine.num_optimization_profiles)]

    def _largest_shapes(self) -> list[Shapes] | None:
        """Each profile's largest inputs, for plans whose inputs have dynamic widths."""
        if all(m.row_size is not None for m in self.inputs):
            return None
        ranges = self.profile_ranges()
        out: list[Shapes] = []
        for profile in ranges:
            shapes = {m.name: profile[m.name][1] if m.name in profile
                      else tuple(int(d or 1) for d in m.shape) for m in self.inputs}
            out.append(shapes)
        return out

    @property
    def max_rows(self) -> int:
        """Most rows one execution of the plan takes (its largest optimization profile's max)."""
        self._require_loaded()
        return self._max_rows

    def open_slot(self, max_rows: int, shapes: Sequence[Shapes] | None = None) -> DeviceSlot:
        """A slot with its own execution context, stream and buffers for `max_rows` rows (and,
        for inputs of dynamic widths, the largest of `shapes`)."""
        self._require_loaded()
        if max_rows > self._max_rows:
            raise BackendError(f"the plan runs at most {self._max_rows} rows per batch (its "
                               f"optimization profiles), and a slot of {max_rows} was asked for; "
                               "rebuild the plan with a larger batch size or lower --batch-size")
        slot = TensorRTSlot(self, max_rows, shapes)
        self._slots.add(slot)
        return slot

    def _infer(self, batch: Batch) -> Batch:
        rows = next(iter(batch.values())).shape[0] if batch else 0
        if self._sync is None:
            self._sync = TensorRTSlot(self, self._max_rows, self._largest_shapes())
        slot = self._sync
        if rows == 0:
            return {m.name: np.empty((0, *(d or 0 for d in m.row_shape)), m.dtype)
                    for m in self.outputs}
        parts: list[Batch] = []
        # Batches larger than the profile allows run as several executions.
        for start in range(0, rows, slot.max_rows):
            stop = min(rows, start + slot.max_rows)
            if slot.dynamic:
                shapes = {m.name: (stop - start, *batch[m.name].shape[1:]) for m in self.inputs}
                for meta in self.inputs:
                    np.copyto(slot.input_view(meta.name, shapes[meta.name]),
                              batch[meta.name][start:stop])
                slot.submit(stop - start, shapes=shapes)
            else:
                for meta in self.inputs:
                    np.copyto(slot.host_inputs[meta.name][: stop - start],
                              batch[meta.name][start:stop])
                slot.submit(stop - start)
            parts.append({name: value.copy() for name, value in slot.wait().items()})
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def _close(self) -> None:
        for slot in list(self._slots):
            slot.close()
        if self._sync is not None:
            self._sync.close()
            self._sync = None
        # Destruction order matters to TensorRT: contexts (slots), then engine, then runtime.
        del self.engine
        del self._runtime
        self._logger.close()
        # The libraries stay loaded (TensorRT does not unload plugins); their files can go.
        self._plugin_dir.cleanup()


class TensorRTSlot(DeviceSlot):
    """One batch in flight: an execution context, a stream, timing events, pinned and device buffers.

    The slot owns every resource it creates and frees them in `close()`, after its stream's
    work is done. Execution contexts are independent, so K slots can hold K batches at once (the
    pool decides how many execute at once, through `submit`'s `after` event). Each batch runs on
    the optimization profile that holds it, switched on the slot's stream when it changes: by
    rows (`choose_profile`; a batch below that profile's minimum runs padded to it), or, with
    `shapes` (inputs of dynamic widths), by shape (`pick_profile`), buffers then holding the
    largest of `shapes` and each batch setting its own input shapes.
    """

    def __init__(self, backend: TensorRTBackend, max_rows: int,
                 shapes: Sequence[Shapes] | None = None) -> None:
        if max_rows < 1:
            raise BackendError(f"a device slot needs max_rows >= 1, got {max_rows}")
        self._cuda = backend._cuda
        self._logger = backend._logger
        self.max_rows = max_rows
        self.dynamic = shapes is not None
        self._largest = list(shapes or ())
        self._ranges = backend.profile_ranges() if self.dynamic else []
        self._profile = 0  # every context starts on profile 0
        # A plan with a fixed batch always runs it whole (rows past the batch are ignored).
        self._fixed = backend._fixed_batch is not None and not self.dynamic
        self._profiles = backend._profiles
        # Buffers hold the largest execution this slot makes (a padded one may exceed max_rows).
        self._exec_rows = backend._fixed_batch or (
            max_rows if self.dynamic else max(max_rows, choose_profile(self._profiles, max_rows)[1]))
        self._inputs = backend.inputs
        self._outputs = backend.outputs
        self._resources: list[Any] = []
        self._context: trt.IExecutionContext | None = None
        self._rows = None
        self._closed = False
        self.host_inputs = {}
        self._host_out: dict[str, np.ndarray] = {}
        self._out_shapes: dict[str, tuple[int, ...]] = {}
        self._device: dict[str, Any] = {}
        self._pinned: dict[str, Any] = {}
        try:
            self._open(backend)
        except BaseException:
            self.close()
            raise

    def _own(self, resource: Any) -> Any:
        self._resources.append(resource)
        return resource

    def _open(self, backend: TensorRTBackend) -> None:
        cuda = self._cuda
        cuda.set_device(backend.config.device_id)  # the current device is per host thread
        self.stream = self._own(cuda.Stream())
        self.timer = self._own(cuda.SlotTimer())
        engine = backend.engine
        context: trt.IExecutionContext | None = engine.create_execution_context()
        if context is None:
            raise BackendError(f"TensorRT could not create an execution context "
                               f"({self._logger.last_errors()}); the GPU may be out of memory: "
                               "lower --batch-size or --slots")
        self._context = context
        if self.dynamic:
            self._open_dynamic(context)
        else:
            if not self._fixed:
                self._use_profile(choose_profile(self._profiles, self.max_rows)[0])
            for meta in self._inputs:
                shape = (self._exec_rows, *(int(d) for d in meta.row_shape if d is not None))
                if not self._fixed and not context.set_input_shape(meta.name, shape):
                    raise BackendError(f"the plan rejects input '{meta.name}' of shape "
                                       f"{list(shape)}: {self._logger.last_errors()}")
                self.host_inputs[meta.name] = self._allocate(meta, shape)[: self.max_rows]
            for meta in self._outputs:
                # With every input at its largest, the outputs are at theirs: size for that.
                shape = self._output_shape(context, meta.name)
                self._host_out[meta.name] = self._allocate(meta, shape).reshape(-1)
        self._set_addresses(context)

    def _open_dynamic(self, context: trt.IExecutionContext) -> None:
        """Buffers for the largest of `shapes`: inputs as given, outputs as TensorRT derives."""
        sizes: dict[str, int] = {}
        for shapes in self._largest:
            self._set_shapes(context, shapes, self.stream.handle)
            for meta in self._inputs:
                sizes[meta.name] = max(sizes.get(meta.name, 0), math.prod(shapes[meta.name]))
            for meta in self._outputs:
                size = math.prod(self._output_shape(context, meta.name))
                sizes[meta.name] = max(sizes.get(meta.name, 0), size)
        for meta in self._inputs:
            self.host_inputs[meta.name] = self._allocate(meta, (sizes[meta.name],))
        for meta in self._outputs:
            self._host_out[meta.name] = self._allocate(meta, (sizes[meta.name],))

    def _output_shape(self, context: trt.IExecutionContext, name: str) -> tuple[int, ...]:
        shape = _shape(context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise BackendError(f"plan output '{name}' has a data-dependent shape {list(shape)}; "
                               "the runner needs output shapes that follow from the input shapes")
        return shape

    def _set_addresses(self, context: trt.IExecutionContext) -> None:
        for name, buffer in self._device.items():
            if not context.set_tensor_address(name, buffer.ptr):
                raise BackendError(f"TensorRT refused the device address of tensor '{name}': "
                                   f"{self._logger.last_errors()}")

    def _use_profile(self, index: int) -> None:
        """Switch the context to optimization profile `index`, ordered on the slot's stream."""
        context = self._context
        if index == self._profile or context is None:
            return
        if not context.set_optimization_profile_async(index, self.stream.handle):
            raise BackendError(f"TensorRT refused optimization profile {index} "
                               f"({self._profiles[index]} rows): {self._logger.last_errors()}")
        self._profile = index
        if self._device:
            self._set_addresses(context)

    def _set_shapes(self, context: trt.IExecutionContext, shapes: Shapes, stream: int) -> None:
        """Switch to the profile that holds `shapes` (if it is not the current one), set them."""
        profile = pick_profile(self._ranges, shapes, self._profile)
        if profile is None:
            raise BackendError(f"no optimization profile of the plan holds a batch of "
                               f"{dict(shapes)} (profiles: {self._ranges}); rebuild the plan for "
                               "the job's batch size and max_length")
        if profile != self._profile:
            # Switching invalidates the input shapes (set below, for every batch anyway).
            if not context.set_optimization_profile_async(profile, stream):
                raise BackendError(f"TensorRT could not switch to optimization profile "
                                   f"{profile}: {self._logger.last_errors()}")
            self._profile = profile
            if self._device:
                self._set_addresses(context)
        for meta in self._inputs:
            if not context.set_input_shape(meta.name, tuple(shapes[meta.name])):
                raise BackendError(f"the plan rejects input '{meta.name}' of shape "
                                   f"{list(shapes[meta.name])}: {self._logger.last_errors()}")

    def _allocate(self, meta: TensorMeta, shape: tuple[int, ...]) -> np.ndarray:
        nbytes = max(1, math.prod(shape) * meta.dtype.itemsize)
        self._device[meta.name] = self._own(self._cuda.DeviceBuffer(nbytes))
        pinned = self._own(self._cuda.PinnedBuffer(nbytes))
        self._pinned[meta.name] = pinned
        view: np.ndarray = pinned.view(meta.dtype, shape)
        return view

    def submit(self, rows: int, after: Any = None, shapes: Shapes | None = None) -> None:
        """Enqueue copy-in, `execute_async_v3` and copy-out of `rows` rows on the slot's stream.

        `after`: an event the execution waits for (copies in still overlap it). `shapes`: the
        batch's input shapes (slots opened with `shapes` only).
        """
        context = self._context
        if self._closed or context is None:
            raise BackendError("this TensorRT slot is closed")
        self._check_submit(rows)
        filled = self._take_filled()
        cuda = self._cuda
        stream = self.stream.handle
        if self._fixed:
            exec_rows = self._exec_rows
        elif self.dynamic:
            exec_rows = rows  # the profile follows the batch's shapes (`_set_shapes`)
        else:
            profile, exec_rows = choose_profile(self._profiles, rows)
            self._use_profile(profile)
        self.timer.mark(0, stream)
        if self.dynamic:
            if shapes is None:
                raise BackendError("this TensorRT slot runs batches of dynamic widths; submit "
                                   "each with its shapes")
            self._set_shapes(context, shapes, stream)
        for meta in self._inputs:
            if self.dynamic and shapes is not None:
                shape = tuple(shapes[meta.name])
            else:
                shape = (exec_rows, *(int(d) for d in meta.row_shape if d is not None))
                if not self._fixed and not context.set_input_shape(meta.name, shape):
                    raise BackendError(f"the plan rejects input '{meta.name}' with {exec_rows} "
                                       f"rows: {self._logger.last_errors()}")
            if meta.name not in filled:  # a device fill wrote it already, on this stream
                cuda.copy_htod_async(self._device[meta.name].ptr, self._pinned[meta.name].ptr,
                                     math.prod(shape) * meta.dtype.itemsize, stream)
        self.timer.mark(1, stream)
        if after is not None:
            self.stream.wait_event(after)
        if not context.execute_async_v3(stream):
            raise BackendError(f"TensorRT failed to enqueue a batch of {rows} rows: "
                               f"{self._logger.last_errors()}")
        self.timer.mark(2, stream)
        for meta in self._outputs:
            # Output shapes follow from the input shapes just set.
            shape = _shape(context.get_tensor_shape(meta.name))
            self._out_shapes[meta.name] = shape
            cuda.copy_dtoh_async(self._pinned[meta.name].ptr, self._device[meta.name].ptr,
                                 math.prod(shape) * meta.dtype.itemsize, stream)
        self.timer.mark(3, stream)
        self._rows = rows

    def device_input(self, name: str) -> int:
        if any(meta.name == name for meta in self._inputs):
            return int(self._device[name].ptr)
        return super().device_input(name)

    def wait(self) -> Batch:
        """Block until the batch is done; outputs are pinned views, valid until the next submit."""
        rows = self._wait_rows()
        out = {}
        for meta in self._outputs:
            shape = self._out_shapes[meta.name]
            out[meta.name] = self._host_out[meta.name][: math.prod(shape)].reshape(shape)[:rows]
        return out

    def close(self) -> None:
        """Wait for the stream, then free the context, buffers, events and stream."""
        if self._closed:
            return
        self._closed = True
        stream = self._resources[0] if self._resources else None
        try:
            if stream is not None and not stream.closed:
                stream.synchronize()
        finally:
            # The context refers to the device buffers: release it before them.
            self._context = None
            while self._resources:
                self._resources.pop().close()
