from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from tests.backends.contract import BackendContract
from workers.backends import BackendConfig, create_backend
from workers.backends.base import Backend
from workers.backends.onnxruntime import cuda_provider_available
from workers.errors import BackendError, MissingDependencyError, SpecError


class TestOnnxRuntimeCPU(BackendContract):
    @pytest.fixture
    def backend(self, model_bytes: bytes) -> Iterator[Backend]:
        with create_backend("onnxruntime", model_bytes, BackendConfig(device="cpu")) as backend:
            yield backend


def test_context_manager_loads_and_closes(two_input_onnx) -> None:  # type: ignore[no-untyped-def]
    backend = create_backend("onnxruntime", two_input_onnx.read_bytes())
    with backend as loaded:
        assert loaded.is_loaded
        assert loaded.infer({"image": np.ones((2, 3, 4, 4), np.float32),
                             "meta": np.ones((2, 8), np.float32)})["logits"].shape == (2, 5)
    assert not backend.is_loaded


def test_metadata_before_load_refuses(two_input_onnx) -> None:  # type: ignore[no-untyped-def]
    backend = create_backend("onnxruntime", two_input_onnx.read_bytes())
    with pytest.raises(BackendError, match="onnxruntime backend is not loaded; call load"):
        _ = backend.inputs


def test_not_onnx_bytes() -> None:
    with pytest.raises(SpecError, match="is not an ONNX model"):
        create_backend("onnxruntime", b"this is not a model").load()


def test_unknown_backend_name() -> None:
    with pytest.raises(SpecError, match="backend 'torch' is not one of tensorrt, onnxruntime"):
        create_backend("torch", b"")


@pytest.mark.skipif(cuda_provider_available(), reason="onnxruntime-gpu is installed here")
def test_cuda_without_provider_says_how_to_install(two_input_onnx) -> None:  # type: ignore[no-untyped-def]
    backend = create_backend("onnxruntime", two_input_onnx.read_bytes(), BackendConfig(device="cuda"))
    with pytest.raises(MissingDependencyError, match="pip install onnxruntime-gpu"):
        backend.load()
