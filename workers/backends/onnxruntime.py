"""ONNX Runtime backend: CPU, or the CUDA provider when onnxruntime-gpu is installed.

`--precision fp16|bf16` means what it means on TensorRT: the model is converted with the same
converter the plan builder uses (`workers.onnx_precision.convert_float`, I/O kept FP32) and the
CUDA provider runs the converted model. The CPU provider is refused: it computes FP16 graphs in
FP32 behind inserted Casts, so the run would be neither FP16 nor faster. int8/fp8 need the
model's own Q/DQ nodes, which ONNX Runtime runs as they are.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from workers.backends.base import Backend, BackendConfig, Batch, DeviceSlot, Shapes
from workers.errors import BackendError, MissingDependencyError, SpecError
from workers.external_data import refuse_without_directory
from workers.plugins import local_plugin_files
from workers.tensors import TensorMeta, describe_onnx, resolve_shape


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
                 cuda_options: Mapping[str, str] | None = None,
                 external_data: Mapping[str, bytes] | None = None) -> None:
        """`cuda_options`: extra CUDA provider options (e.g. `{"use_tf32": "0"}`), for every session.

        `external_data`: the bytes of each external file the model names, by its location, as
        the driver read them beside the model; a model that names any other is refused (see
        `workers.external_data`), so ONNX Runtime never opens a file itself.
        """
        super().__init__(model, config)
        self.cuda_options = dict(cuda_options or {})
        self.external_data = dict(external_data or {})

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
        # Metadata comes from the graph itself so every backend reports the same dtypes and shapes:
        # the driver's description of it, or this backend's own.
        if self.config.model_io is not None:
            inputs, outputs = self.config.model_io
        else:
            info = describe_onnx(self._model)
            inputs, outputs = info.inputs, info.outputs
            refuse_without_directory(self._model, "model", self.external_data)
        providers = self._providers()
        # --plugins: custom-op libraries, fetched once per backend (workers/plugins.py).
        self._plugin_dir = tempfile.TemporaryDirectory(prefix="ort-custom-ops-")
        self._plugin_files = local_plugin_files(self.config.plugins, self.config.storage_options,
                                                self._plugin_dir.name)
        on_cuda = providers[0] != "CPUExecutionProvider"
        self._session_model = self._precision_model("cuda" if on_cuda else "cpu")
        self.session = self._new_session(providers)
        self._output_names = [meta.name for meta in outputs]
        self.providers = list(self.session.get_providers())
        self.device = "cuda" if "CUDAExecutionProvider" in self.providers else "cpu"
        return tuple(inputs), tuple(outputs)

    def _precision_model(self, device: str) -> bytes:
        """The model bytes the sessions load: the model itself, or its fp16/bf16 conversion."""
        precision = self.config.precision
        if precision == "fp32":
            return self._model
        from workers.onnx_precision import convert_float, model_types  # imports onnx
        types = model_types(self._model)
        check_precision(precision, device, types)
        if precision in ("fp16", "bf16") and not types.computes_in(precision):
            if self.external_data:
                raise SpecError(f"--precision {precision} on ONNX Runtime converts the model, "
                                "and this one keeps its weights in external files, which the "
                                "conversion does not read; save the model with its weights "
                                "inline (onnx.save(model, path, save_as_external_data=False), "
                                "under 2 GiB), or pass --precision fp32")
            return convert_float(self._model, precision)
        return self._model

    def _new_session(self, providers: list[Any], threads: int | None = None) -> Any:
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        # On the GPU the CPU threads only run shape ops, and idle ones spin: they would take
        # the cores the actor's tokenizing and decoding threads need.
        on_gpu = any("CUDAExecutionProvider" in str(p) for p in providers)
        if threads is None:
            threads = 1 if on_gpu else self.config.threads
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        for path in self._plugin_files:
            try:
                options.register_custom_ops_library(path)
            except Exception as exc:  # ORT raises its own Fail for a library it cannot load
                raise BackendError(f"ONNX Runtime could not load custom-op library '{path}' "
                                   f"({exc}); check --plugins") from exc
        if self.external_data:
            # ONNX Runtime takes these instead of opening the files, and refuses a model that
            # names any file not among them.
            names = sorted(self.external_data)
            options.add_external_initializers_from_files_in_memory(
                names, [self.external_data[n] for n in names],
                [len(self.external_data[n]) for n in names])
        try:
            return ort.InferenceSession(self._session_model, options, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise BackendError(f"ONNX Runtime could not load the model: {exc}") from exc

    @property
    def uses_slots(self) -> bool:
        """On the CUDA provider, with every output's shape known from its inputs' (fixed row
        shapes, or dynamic dims named after input dims): batches run on slots' streams."""
        if not (self.is_loaded and self.device == "cuda"):
            return False
        probe = {m.name: tuple(1 if d is None else d for d in m.shape) for m in self.inputs}
        return all(resolve_shape(m, self.inputs, probe) is not None for m in self.outputs)

    def open_slot(self, max_rows: int, shapes: Sequence[Shapes] | None = None) -> DeviceSlot:
        """A slot with its own CUDA stream, ORT session on that stream, and I/O bound on the GPU."""
        self._require_loaded()
        if self.device != "cuda":
            raise BackendError(f"{self.name} backend runs on the CPU here, so it has no device "
                               "slots; install onnxruntime-gpu and run with device 'cuda'")
        return OrtCudaSlot(self, max_rows, shapes)

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
    With `shapes` (text), buffers hold the largest of them, and each batch is bound at its own
    shape to the first bytes of the same buffers; output shapes follow from the inputs' by the
    graph's dimension names.
    """

    def __init__(self, backend: OnnxRuntimeBackend, max_rows: int,
                 shapes: Sequence[Shapes] | None = None) -> None:
        from workers import cuda

        if max_rows < 1:
            raise BackendError(f"a device slot needs max_rows >= 1, got {max_rows}")
        self._in_metas = backend.inputs
        if shapes is None:
            for meta in (*backend.inputs, *backend.outputs):
                if meta.row_size is None:
                    raise BackendError(f"'{meta.name}' is {meta.describe()}: device slots need "
                                       "fixed row shapes, or the largest batch shapes; export "
                                       "the model with static non-batch dims")
        self.max_rows = max_rows
        self._device_id = backend.config.device_id
        self._resources: list[Any] = []
        self._rows = None
        self._bound: tuple[Any, ...] | None = None
        self._out_shapes: dict[str, tuple[int, ...]] = {}
        try:
            cuda.set_device(self._device_id)
            self.stream = self._own(cuda.Stream())
            self.timer = self._own(cuda.SlotTimer())
            self._inputs = [self._buffers(meta, shapes) for meta in backend.inputs]
            self._outputs = [self._buffers(meta, shapes) for meta in backend.outputs]
            self.host_inputs = {meta.name: host for meta, host, _, _ in self._inputs}
            self.host_outputs = {meta.name: host for meta, host, _, _ in self._outputs}
            options = {**backend.cuda_options, "device_id": str(self._device_id),
                       "user_compute_stream": str(self.stream.handle),
                       "has_user_compute_stream": "1"}
            # One CPU thread: the CUDA provider runs the graph; the actor's CPUs (its threads
            # setting) are the readers' and decoders', which an idle ORT pool would only spin on.
            self.session = backend._new_session([("CUDAExecutionProvider", options)], threads=1)
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

    def _buffers(self, meta: TensorMeta, shapes: Sequence[Shapes] | None
                 ) -> tuple[TensorMeta, np.ndarray, Any, Any]:
        """Pinned and device buffers for one tensor: `max_rows` rows, or the largest of its
        shapes in `shapes` (then the host view is flat: batches view its first elements)."""
        from workers import cuda

        if shapes is None:
            row_shape = tuple(int(d) for d in meta.row_shape if d is not None)
            shape: tuple[int, ...] = (self.max_rows, *row_shape)
        else:
            sizes = []
            for batch in shapes:
                resolved = resolve_shape(meta, self._in_metas, batch)
                if resolved is None:
                    raise BackendError(f"output '{meta.name}' is {meta.describe()}, and its "
                                       "dynamic dims are not named after the inputs' dims, so "
                                       "its size per batch is unknown; export the model with "
                                       "matching dim names (dynamic_axes)")
                sizes.append(math.prod(resolved))
            shape = (max(sizes),)
        nbytes = math.prod(shape) * meta.dtype.itemsize
        pinned = self._own(cuda.PinnedBuffer(max(nbytes, 1)))
        device = self._own(cuda.DeviceBuffer(max(nbytes, 1)))
        return meta, pinned.view(meta.dtype, shape), pinned, device

    def _batch_shapes(self, rows: int, shapes: Shapes | None) -> dict[str, tuple[int, ...]]:
        """Every input's and output's shape in a batch of `rows` rows at `shapes`."""
        if shapes is None:
            return {meta.name: (rows, *host.shape[1:])
                    for meta, host, _, _ in (*self._inputs, *self._outputs)}
        out = {name: tuple(shape) for name, shape in shapes.items()}
        for meta, _, _, _ in self._outputs:
            resolved = resolve_shape(meta, self._in_metas, shapes)
            if resolved is None:  # sized for `shapes` when opened, so this cannot happen
                raise BackendError(f"output '{meta.name}' has no shape for inputs {shapes}")
            out[meta.name] = resolved
        return out

    def _bind(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        key = tuple(sorted(shapes.items()))
        if key == self._bound:
            return
        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()
        for meta, _, _, device in self._inputs:
            self.binding.bind_input(meta.name, "cuda", self._device_id, meta.dtype.type,
                                    list(shapes[meta.name]), device.ptr)
        for meta, _, _, device in self._outputs:
            self.binding.bind_output(meta.name, "cuda", self._device_id, meta.dtype.type,
                                     list(shapes[meta.name]), device.ptr)
        self._bound = key

    def execute(self, rows: int, shapes: Shapes | None = None) -> None:
        """Enqueue only the model's execution on the slot's device buffers (no copies)."""
        self._bind(self._batch_shapes(rows, shapes))
        try:
            self.session.run_with_iobinding(self.binding, self.run_options)
        except Exception as exc:
            raise BackendError(f"ONNX Runtime failed on a batch of {rows} rows: {exc}") from exc

    def submit(self, rows: int, after: Any = None, shapes: Shapes | None = None) -> None:
        from workers import cuda

        self._check_submit(rows)
        filled = self._take_filled()
        batch = self._batch_shapes(rows, shapes)
        stream = self.stream.handle
        self.timer.mark(0, stream)
        for meta, _, pinned, device in self._inputs:
            if meta.name not in filled:  # a device fill wrote it already, on this stream
                nbytes = math.prod(batch[meta.name]) * meta.dtype.itemsize
                cuda.copy_htod_async(device.ptr, pinned.ptr, nbytes, stream)
        self.timer.mark(1, stream)
        if after is not None:
            self.stream.wait_event(after)
        self.execute(rows, shapes)
        self.timer.mark(2, stream)
        for meta, _, pinned, device in self._outputs:
            nbytes = math.prod(batch[meta.name]) * meta.dtype.itemsize
            cuda.copy_dtoh_async(pinned.ptr, device.ptr, nbytes, stream)
        self.timer.mark(3, stream)
        self._out_shapes = {meta.name: batch[meta.name] for meta, _, _, _ in self._outputs}
        self._rows = rows

    def wait(self) -> Batch:
        rows = self._wait_rows()
        out = {}
        for name, host in self.host_outputs.items():
            shape = self._out_shapes[name]
            out[name] = host.reshape(-1)[:math.prod(shape)].reshape(shape)[:rows]
        return out

    def device_input(self, name: str) -> int:
        for meta, _, _, device in self._inputs:
            if meta.name == name:
                return int(device.ptr)
        return super().device_input(name)

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
