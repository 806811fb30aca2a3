"""ONNX Runtime backend: CPU, or the CUDA provider when onnxruntime-gpu is installed."""

from __future__ import annotations

import os
from typing import Any, ClassVar

import numpy as np

from workers.backends.base import Backend, Batch
from workers.errors import BackendError, MissingDependencyError
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


class OnnxRuntimeBackend(Backend):
    """Runs an ONNX model with ONNX Runtime; `config.device` picks the CPU or CUDA provider."""

    name: ClassVar[str] = "onnxruntime"
    session: Any

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
            return [("CUDAExecutionProvider", {"device_id": self.config.device_id}),
                    "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _load(self) -> tuple[tuple[TensorMeta, ...], tuple[TensorMeta, ...]]:
        ort = import_onnxruntime()
        # Metadata comes from the graph itself so every backend reports the same dtypes and shapes.
        info = describe_onnx(self._model)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.config.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(self._model, options, providers=self._providers())
        except MissingDependencyError:
            raise
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise BackendError(f"ONNX Runtime could not load the model: {exc}") from exc
        self._output_names = [meta.name for meta in info.outputs]
        self.providers = list(self.session.get_providers())
        self.device = "cuda" if "CUDAExecutionProvider" in self.providers else "cpu"
        return info.inputs, info.outputs

    def _infer(self, batch: Batch) -> Batch:
        try:
            values = self.session.run(self._output_names, batch)
        except Exception as exc:
            raise BackendError(f"ONNX Runtime failed on a batch: {exc}") from exc
        return {name: np.asarray(v) for name, v in zip(self._output_names, values, strict=True)}

    def _close(self) -> None:
        del self.session
