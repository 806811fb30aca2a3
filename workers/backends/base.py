"""The backend interface: load once, describe inputs/outputs, infer batches, close.

Shaped like Polygraphy's runners: the base class owns the lifecycle and input checking; each
backend implements only the hooks `_load`, `_infer` and `_close`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Literal

import numpy as np

from workers.errors import BackendError, DataError
from workers.tensors import TensorMeta

Batch = dict[str, np.ndarray]
Device = Literal["auto", "cpu", "cuda"]
#: Every input's shape in one batch (batches whose inputs' widths vary, as text's do).
Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class BackendConfig:
    """How a backend runs: which device, how many CPU threads, numeric precision.

    `device="auto"` takes the GPU when the actor was given one and the backend can use it.
    """

    device: Device = "auto"
    threads: int = 1
    precision: str = "fp32"
    device_id: int = 0
    #: TensorRT: let the runtime load plans that carry host code (version-compatible plans with
    #: the lean runtime inside), which then runs in the worker. Set only for plans the driver
    #: trusts: built by this run, or signed with the job's plan key (jobs/plan_share.py).
    engine_host_code_allowed: bool = False
    #: `--plugins`: (uri, sha256) of each plugin library (TensorRT) or custom-op library (ONNX
    #: Runtime), loaded before the plan or model (workers/plugins.py), and the storage options
    #: to fetch them with (frozen, as specs carry them).
    plugins: tuple[tuple[str, str], ...] = ()
    storage_options: tuple[tuple[str, Any], ...] = ()
    #: TensorRT: the plan carries the plugin libraries (version-compatible plans serialize
    #: them); the runtime loads them from it, where host code is allowed, instead of from `plugins`.
    plugins_in_plan: bool = False
    #: ONNX Runtime: the model's inputs and outputs as the driver described them, after it
    #: checked the model (its external files included; `jobs.driver.load_model`). An actor then
    #: neither parses the graph again nor imports `onnx` (0.3-1.5 s of its start). None: the
    #: backend describes and checks the model itself.
    model_io: tuple[tuple[TensorMeta, ...], tuple[TensorMeta, ...]] | None = None

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"BackendConfig.threads must be >= 1, got {self.threads}")


class DeviceSlot(ABC):
    """One batch in flight on a GPU: pinned host inputs and outputs, device buffers, a stream.

    The GPU pipeline keeps K slots busy: it fills `host_inputs[name][:rows]` on the host,
    calls `submit(rows)` (async H2D, execute, D2H, event; returns at once) and later `wait()`,
    which returns the outputs as views `[:rows]` of pinned host buffers, valid until the slot's
    next `submit`. Buffers are sized once for `max_rows`. `submit(rows, after=event)` makes the
    execution (not the copy-in) wait on the GPU for `event`, another slot's `executed`: that is
    how `SlotPool` bounds how many batches execute at once.

    Device fills: a caller that writes an input straight into the slot's device buffer
    (`device_input(name)`, on the slot's `stream`, before `submit`) names it in
    `filled_inputs`; `submit` then skips that input's host copy, and clears the set.

    Slots opened with `shapes` (the largest batches they must hold) run each batch at its own
    shape: fill `input_view(name, shape)`, a view of the first elements of the pinned buffer,
    and `submit(rows, shapes=...)`; outputs come back at the shapes that batch makes.
    """

    max_rows: int
    host_inputs: dict[str, np.ndarray]
    #: The slot's CUDA stream (`workers.cuda.Stream`): a device fill enqueues its work on it.
    stream: Any = None
    #: Inputs whose device buffer a device fill wrote for the next `submit` (which skips their
    #: host copies and resets this to empty).
    filled_inputs: frozenset[str] = frozenset()
    #: Optional `workers.cuda.SlotTimer` whose events mark the last batch's stages; the
    #: pipeline reads it for the GPU busy fraction. None: the slot does not time itself.
    timer: Any = None
    #: Rows of the batch submitted and not yet collected (None: no batch in flight).
    _rows: int | None = None

    @abstractmethod
    def submit(self, rows: int, after: Any = None, shapes: Shapes | None = None) -> None:
        """Enqueue copy-in, execution and copy-out of the first `rows` rows on the slot's stream.

        `after`: a `workers.cuda.Event` the execution waits for (None: no wait). `shapes`: each
        input's shape in this batch (None: `rows` rows of the inputs' fixed row shapes).
        """

    def input_view(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The pinned buffer of input `name` as one batch of `shape` (its first elements)."""
        flat = self.host_inputs[name].reshape(-1)
        size = math.prod(shape)
        if size > flat.size:
            raise BackendError(f"a batch of shape {list(shape)} for input '{name}' does not fit "
                               f"its device slot ({flat.size} elements); keep batches within "
                               "the token budget the slots were opened for")
        return flat[:size].reshape(shape)

    def _check_submit(self, rows: int) -> None:
        """Refuse a batch that does not fit, or a submit before the last batch was collected."""
        if not 0 < rows <= self.max_rows:
            raise BackendError(f"a batch of {rows} rows does not fit a device slot of "
                               f"{self.max_rows} rows; keep batches within the batch size")
        if self._rows is not None:
            raise BackendError("submit() on a slot whose batch was not collected; call wait() first")

    def _wait_rows(self) -> int:
        """Block on `timer.done` until the submitted batch (`_rows` rows) is done; its rows."""
        rows = self._rows
        if rows is None:
            raise BackendError("wait() on a slot with no batch submitted; call submit() first")
        self.timer.done.synchronize()
        self._rows = None
        return rows

    def _take_filled(self) -> frozenset[str]:
        """The inputs filled on the device for this submit; resets them for the next one."""
        filled, self.filled_inputs = self.filled_inputs, frozenset()
        return filled

    def device_input(self, name: str) -> int:
        """The device address of input `name`'s buffer (`max_rows` rows), for a device fill."""
        raise BackendError(f"this device slot has no device buffer for input '{name}' to fill")

    @property
    def executed(self) -> Any:
        """The event recorded when this slot's last execution ended (None: the slot has none)."""
        return None if self.timer is None else self.timer.executed

    @abstractmethod
    def wait(self) -> Batch:
        """Block until the submitted batch is done; its outputs, as pinned host views."""

    def stage_seconds(self) -> dict[str, float]:
        """Seconds of the last batch spent in h2d/compute/d2h, from the slot's `timer` events."""
        return {} if self.timer is None else dict(self.timer.stage_seconds())

    @abstractmethod
    def close(self) -> None:
        """Free the slot's buffers, stream and events."""


class Backend(ABC):
    """Base of every backend; use as a context manager or call `load()` and `close()`."""

    name: ClassVar[str]
    #: True when `open_slot` works: the backend runs asynchronously on a GPU stream.
    supports_slots: ClassVar[bool] = False

    def __init__(self, model: bytes, config: BackendConfig | None = None) -> None:
        self._model = model
        self.config = config or BackendConfig()
        self._inputs: tuple[TensorMeta, ...] = ()
        self._outputs: tuple[TensorMeta, ...] = ()
        self.is_loaded = False

    # lifecycle -----------------------------------------------------------------------------
    def load(self) -> Backend:
        """Load the model; idempotent."""
        if not self.is_loaded:
            self._inputs, self._outputs = self._load()
            self.is_loaded = True
        return self

    def close(self) -> None:
        """Release everything the backend holds; idempotent."""
        if self.is_loaded:
            self._close()
            self.is_loaded = False

    def __enter__(self) -> Backend:
        return self.load()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # metadata ------------------------------------------------------------------------------
    @property
    def inputs(self) -> tuple[TensorMeta, ...]:
        self._require_loaded()
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorMeta, ...]:
        self._require_loaded()
        return self._outputs

    # inference -----------------------------------------------------------------------------
    def infer(self, batch: Batch) -> Batch:
        """Run one batch: inputs by name, each `[N, ...]` of the input's dtype; outputs by name."""
        self._require_loaded()
        self.check_batch(batch)
        return self._infer(batch)

    def check_batch(self, batch: Batch) -> int:
        """Check names, dtypes and shapes of a batch against the inputs; return its row count."""
        expected = {meta.name for meta in self.inputs}
        missing = sorted(expected - batch.keys())
        if missing:
            raise DataError(f"batch is missing model input(s) {missing}; it has {sorted(batch)}")
        extra = sorted(batch.keys() - expected)
        if extra:
            raise DataError(f"batch has {extra}, which the model has no input for; "
                            f"its inputs are {sorted(expected)}")
        rows: int | None = None
        for meta in self.inputs:
            array = batch[meta.name]
            if array.dtype != meta.dtype:
                raise DataError(f"input '{meta.name}' got {array.dtype.name}, "
                                f"the model wants {meta.describe()}")
            if array.ndim != len(meta.shape) or any(
                want is not None and got != want
                for got, want in zip(array.shape[1:], meta.row_shape, strict=True)
            ):
                raise DataError(f"input '{meta.name}' got shape {list(array.shape)}, "
                                f"the model wants {meta.describe()}")
            if rows is None:
                rows = array.shape[0]
            elif array.shape[0] != rows:
                raise DataError(f"input '{meta.name}' has {array.shape[0]} rows, "
                                f"other inputs have {rows}; every input needs the same batch")
        return rows or 0

    @property
    def uses_slots(self) -> bool:
        """True when this loaded backend should run through `open_slot` (on a GPU stream)."""
        return self.supports_slots

    def open_slot(self, max_rows: int, shapes: Sequence[Shapes] | None = None) -> DeviceSlot:
        """A new in-flight slot for batches of up to `max_rows` rows (GPU backends only).

        `shapes`: the largest batches (each input's shape) the slot must hold, for models whose
        inputs' widths vary; None: `max_rows` rows of fixed row shapes.
        """
        raise BackendError(f"{self.name} backend runs synchronously; it has no device slots")

    def _require_loaded(self) -> None:
        if not self.is_loaded:
            raise BackendError(f"{self.name} backend is not loaded; call load() or use `with`")

    # hooks ---------------------------------------------------------------------------------
    @abstractmethod
    def _load(self) -> tuple[tuple[TensorMeta, ...], tuple[TensorMeta, ...]]:
        """Load the model and return (inputs, outputs)."""

    @abstractmethod
    def _infer(self, batch: Batch) -> Batch:
        """Run a checked batch."""

    def _close(self) -> None:  # noqa: B027 - optional hook
        """Free what `_load` took."""
