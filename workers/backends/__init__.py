"""Backends: one interface over TensorRT and ONNX Runtime, chosen by name."""

from __future__ import annotations

from workers.backends.base import Backend, BackendConfig, Batch
from workers.errors import SpecError

BACKEND_NAMES = ("auto", "tensorrt", "onnxruntime")


def create_backend(name: str, model: bytes, config: BackendConfig | None = None) -> Backend:
    """Make (not load) the backend `name` over `model` (ONNX bytes, or plan bytes for TensorRT)."""
    if name == "onnxruntime":
        from workers.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(model, config)
    if name == "tensorrt":
        from workers.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(model, config)
    raise SpecError(f"backend '{name}' is not one of tensorrt, onnxruntime; "
                    "resolve 'auto' before creating a backend")


__all__ = ["BACKEND_NAMES", "Backend", "BackendConfig", "Batch", "create_backend"]
