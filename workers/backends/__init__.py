"""Backends: one interface over TensorRT and ONNX Runtime, chosen by name."""

from __future__ import annotations

from workers.backends.base import Backend, BackendConfig, Batch
from workers.errors import SpecError
from workers.external_data import ModelFiles

BACKEND_NAMES = ("auto", "tensorrt", "onnxruntime")


def create_backend(name: str, model: bytes | ModelFiles, config: BackendConfig | None = None
                   ) -> Backend:
    """Make (not load) the backend `name` over `model`: ONNX bytes (with the external-data files
    the driver read beside the model, as ModelFiles), or plan bytes for TensorRT."""
    if name == "onnxruntime":
        from workers.backends.onnxruntime import OnnxRuntimeBackend

        if isinstance(model, ModelFiles):
            return OnnxRuntimeBackend(model.model, config, external_data=dict(model.external))
        return OnnxRuntimeBackend(model, config)
    if name == "tensorrt":
        from workers.backends.tensorrt import TensorRTBackend

        if isinstance(model, ModelFiles):
            raise SpecError("the TensorRT backend runs a plan, which holds its weights; pass "
                            "the plan's bytes")
        return TensorRTBackend(model, config)
    raise SpecError(f"backend '{name}' is not one of tensorrt, onnxruntime; "
                    "resolve 'auto' before creating a backend")


__all__ = ["BACKEND_NAMES", "Backend", "BackendConfig", "Batch", "ModelFiles", "create_backend"]
