"""ONNX Runtime backend: CPU, or the CUDA provider when onnxruntime-gpu is installed.

`--precision fp16|bf16` means what it means on TensorRT: the model is converted with the same
converter the plan builder uses (`workers.onnx_precision.convert_float`, I/O kept FP32) and the
CUDA provider runs the converted model. The CPU provider is refused: it computes FP16 graphs in
FP32 behind inserted Casts, so the run would be neither FP16 nor faster. int8/fp8 need the
model's own Q/DQ nodes, which ONNX Runtime runs as they are.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from workers.backends.base import Backend, BackendConfig, Batch, DeviceSlot
from workers.errors import BackendError, MissingDependencyError, SpecError
from workers.plugins import local_plugin_files
from workers.tensors import TensorMeta, describe_onnx


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError(
            "ONNX Runtime is not installed; pip install onnxruntime (or onnxruntime-gpu on GPU nodes)"
        ) from exc
    return onnxruntime


def cuda_provider_available() -> bool:
    """True when the installed ONNX Runtime build has the CUDA execution provider."""
    try:
        ort = import_onnxruntime()
    except MissingDependencyError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def gpu_visible() -> bool:
    """True when this process was given a GPU (Ray sets CUDA_VISIBLE_DEVICES for GPU actors)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible is not None and visible.strip() not in ("", "-1", "NoDevFiles")


def check_precision(precision: str, device: str, types: Any, source: str = "the model") -> None:
    """Refuse a precision ONNX Runtime cannot honour on `device` ("cpu" or "cuda"), naming the fix.

    `types`: the model's `workers.onnx_precision.ModelTypes`.
    """
    if precision in ("fp16", "bf16") and device != "cuda":
        raise SpecError(
            f"precision {precision} with ONNX Runtime needs its CUDA provider, and this runs on "
            f"the CPU provider, which computes {precision} models in fp32 behind inserted Casts "
            f"(neither {precision} nor faster); run on GPU nodes with onnxruntime-gpu "
            "(pip install '.[gpu]'), or use --precision fp32")
    if precision in ("int8", "fp8") and not types.carries(precision):
        raise SpecError(
            f"precision {precision} needs a model with explicit quantization (QuantizeLinear/"
            f"DequantizeLinear nodes producing {precision}), and {source} has none; quantize it "
            "with NVIDIA ModelOpt (python -m modelopt.onnx.quantization --onnx_path MODEL.onnx "
            f"--quantize_mode {precision}) and pass the quantized model, or use --precision fp32")


class OnnxRuntimeBackend(Backend):
    """Runs an ONNX model with ONNX Runtime; `config.device` picks the CPU or CUDA provider."""

    name: ClassVar[str] = "onnxruntime"
    supports_slots: ClassVar[bool] = True
    session: Any
    #: what the sessions load: the model, or its conversion for --precision fp16/bf16
    _session_model: bytes

    def __init__(self, model: bytes, config: BackendConfig | None = None,
                 cuda_options: Mapping[str, str] | None = None) -> None:
        """`cuda_options`: extra CUDA provider options (e.g. `{"use_tf32": "0"}`), for every session."""
        super().__init__(model, config)
        self.cuda_options = dict(cuda_options or {})

    def _providers(self) -> list[Any]:
        device = self.config.device
        if device == "auto":
            device = "cuda" if gpu_visible() and cuda_provider_available() else "cpu"
        if device == "cuda":
            if not cuda_provider_available():
                raise MissingDependencyError(
                    "ONNX Runtime has no CUDA provider here; pip install onnxruntime-gpu "
                    "(replacing onnxruntime), or run on the CPU"
                )
            return [("CUDAExecutionProvider",
                     {"device_id": str(self.config.device_id), **self.cuda_options}),
                    "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _load(self) -> tuple[tuple[TensorMeta, ...], tuple[TensorMeta, ...]]:
        # Metadata comes from the graph itself so every backend reports the same dtypes and shapes.
        info = describe_onnx(self._model)
        providers = self._providers()
        # --plugins: custom-op libraries, fetched once per backend (workers/plugins.py).
        self._plugin_dir = tempfile.TemporaryDirectory(prefix="ort-custom-ops-")
        self._plugin_files = local_plugin_files(self.config.plugins, self.config.storage_options,
                                                self._plugin_dir.name)
        on_cuda = providers[0] != "CPUExecutionProvider"
        self._session_model = self._precision_model("cuda" if on_cuda else "cpu")
        self.session = self._new_session(providers)
        self._output_names = [meta.name for meta in info.outputs]
        self.providers = list(self.session.get_providers())
        self.device = "cuda" if "CUDAExecutionProvider" in self.providers else "cpu"
        return info.inputs, info.outputs

    def _precision_model(self, device: str) -> bytes:
        """The model bytes the sessions load: the model itself, or its fp16/bf16 conversion."""
        from workers.onnx_precision import convert_float, model_types

        precision = self.config.precision
        if precision == "fp32":
            return self._model
        types = model_types(self._model)
        check_precision(precision, device, types)
        if precision in ("fp16", "bf16") and not types.computes_in(precision):
            return convert_float(self._model, precision)
        return self._model

    def _new_session(self, providers: list[Any]) -> Any:
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.config.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        for path in self._plugin_files:
            try:
                options.register_custom_ops_library(path)
            except Exception as exc:  # ORT raises its own Fail for a library it cannot load
                raise BackendError(f"ONNX Runtime could not load custom-op library '{path}' "
                                   f"({exc}); check --plugins") from exc
        try:
            return ort.InferenceSession(self._session_model, options, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise BackendError(f"ONNX Runtime could not load the model: {exc}") from exc

    @property
    def uses_slots(self) -> bool:
        """On the CUDA provider with fixed row shapes: batches run on slots' streams."""
        return (self.is_loaded and self.device == "cuda"
                and all(m.row_size is not None for m in (*self.inputs, *self.outputs)))

    def open_slot(self, max_rows: int) -> DeviceSlot:
        """A slot with its own CUDA stream, ORT session on that stream, and I/O bound on the GPU."""
        self._require_loaded()
        if self.device != "cuda":
            raise BackendError(f"{self.name} backend runs on the CPU here, so it has no device "
                               "slots; install onnxruntime-gpu and run with device 'cuda'")
        return OrtCudaSlot(self, max_rows)

    def _infer(self, batch: Batch) -> Batch:
        try:
            values = self.session.run(self._output_names, batch)
        except Exception as exc:
            raise BackendError(f"ONNX Runtime failed on a batch: {exc}") from exc
        return {name: np.asarray(v) for name, v in zip(self._output_names, values, strict=True)}

    def _close(self) -> None:
        del self.session
        self._plugin_dir.cleanup()


class OrtCudaSlot(DeviceSlot):
    """One batch in flight through ONNX Runtime's CUDA provider, on a stream the slot owns.

    The provider's `user_compute_stream` is a session-wide setting, so each slot runs its own
    session on its own stream (the weights are on the GPU once per slot). Inputs and outputs
    are bound with IOBinding to the slot's device buffers; runs skip ORT's end-of-run stream
    synchronization, so `submit` returns once the work is enqueued and `wait` blocks on an event.
    """

    def __init__(self, backend: OnnxRuntimeBackend, max_rows: int) -> None:
        from workers import cuda

        if max_rows < 1:
            raise BackendError(f"a device slot needs max_rows >= 1, got {max_rows}")
        for meta in (*backend.inputs, *backend.outputs):
            if meta.row_size is None:
                raise BackendError(f"'{meta.name}' is {meta.describe()}: device slots need fixed "
                                   "row shapes; export the model with static non-batch dims")
        self.max_rows = max_rows
        self._device_id = backend.config.device_id
        self._resources: list[Any] = []
        self._rows = None
        self._bound_rows: int | None = None
        try:
            cuda.set_device(self._device_id)
            self.stream = self._own(cuda.Stream())
            self.timer = self._own(cuda.SlotTimer())
            self._inputs = [self._buffers(meta) for meta in backend.inputs]
            self._outputs = [self._buffers(meta) for meta in backend.outputs]
            self.host_inputs = {meta.name: host for meta, host, _, _ in self._inputs}
            self.host_outputs = {meta.name: host for meta, host, _, _ in self._outputs}
            options = {**backend.cuda_options, "device_id": str(self._device_id),
                       "user_compute_stream": str(self.stream.handle),
                       "has_user_compute_stream": "1"}
            self.session = backend._new_session([("CUDAExecutionProvider", options)])
            if "CUDAExecutionProvider" not in self.session.get_providers():
                raise BackendError("ONNX Runtime did not enable its CUDA provider for a device slot "
                                   f"(it has {self.session.get_providers()}); check the CUDA and "
                                   "cuDNN libraries onnxruntime-gpu needs")
            self.binding = self.session.io_binding()
            ort = import_onnxruntime()
            self.run_options = ort.RunOptions()
            # The slot's event says when the batch is done; ORT's own end-of-run sync would
            # block the host for the whole execution and serialize the slots.
            self.run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        except BaseException:
            self.close()
            raise

    def _own(self, resource: Any) -> Any:
        self._resources.append(resource)
        return resource

    def _buffers(self, meta: TensorMeta) -> tuple[TensorMeta, np.ndarray, Any, Any]:
        from workers import cuda

        row_shape = tuple(int(d) for d in meta.row_shape if d is not None)
        nbytes = self.max_rows * (meta.row_size or 0) * meta.dtype.itemsize
        pinned = self._own(cuda.PinnedBuffer(max(nbytes, 1)))
        device = self._own(cuda.DeviceBuffer(max(nbytes, 1)))
        return meta, pinned.view(meta.dtype, (self.max_rows, *row_shape)), pinned, device

    def _bind(self, rows: int) -> None:
        if rows == self._bound_rows:
            return
        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()
        for meta, host, _, device in self._inputs:
            self.binding.bind_input(meta.name, "cuda", self._device_id, meta.dtype.type,
                                    [rows, *host.shape[1:]], device.ptr)
        for meta, host, _, device in self._outputs:
            self.binding.bind_output(meta.name, "cuda", self._device_id, meta.dtype.type,
                                     [rows, *host.shape[1:]], device.ptr)
        self._bound_rows = rows

    def execute(self, rows: int) -> None:
        """Enqueue only the model's execution on the slot's device buffers (no copies)."""
        self._bind(rows)
        try:
            self.session.run_with_iobinding(self.binding, self.run_options)
        except Exception as exc:
            raise BackendError(f"ONNX Runtime failed on a batch of {rows} rows: {exc}") from exc

    def submit(self, rows: int, after: Any = None) -> None:
        from workers import cuda

        self._check_submit(rows)
        stream = self.stream.handle
        self.timer.mark(0, stream)
        for _, host, pinned, device in self._inputs:
            cuda.copy_htod_async(device.ptr, pinned.ptr, rows * host[0].nbytes, stream)
        self.timer.mark(1, stream)
        if after is not None:
            self.stream.wait_event(after)
        self.execute(rows)
        self.timer.mark(2, stream)
        for _, host, pinned, device in self._outputs:
            cuda.copy_dtoh_async(pinned.ptr, device.ptr, rows * host[0].nbytes, stream)
        self.timer.mark(3, stream)
        self._rows = rows

    def wait(self) -> Batch:
        rows = self._wait_rows()
        return {name: host[:rows] for name, host in self.host_outputs.items()}

    def close(self) -> None:
        """Wait for anything in flight, then free the session and every buffer, stream and event."""
        stream = self._resources[0] if self._resources else None
        try:
            if stream is not None and not stream.closed:
                stream.synchronize()
        finally:
            self.__dict__.pop("binding", None)
            self.__dict__.pop("session", None)
            while self._resources:
                self._resources.pop().close()
