"""The contract every backend runs: metadata, a numeric round trip, partial batches, bad input.

Subclass `BackendContract` and provide the `backend` fixture (a loaded backend over
`tests.models.two_input_model(seed=CONTRACT_SEED)`), as fsspec's abstract test suites are used.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.models import two_input_model
from workers.backends.base import Backend
from workers.errors import BackendError, DataError

CONTRACT_SEED = 5


def reference(model_bytes: bytes, image: np.ndarray, meta: np.ndarray) -> dict[str, np.ndarray]:
    """The two-input model computed with numpy from its own initializers."""
    weights = {t.name: numpy_helper.to_array(t)
               for t in onnx.load_model_from_string(model_bytes).graph.initializer}
    logits = (image.reshape(len(image), -1).astype(np.float64) @ weights["w1"]
              + meta.astype(np.float64) @ weights["w2"] + weights["b"])
    return {"logits": logits, "score": logits.sum(axis=1, keepdims=True)}


class BackendContract:
    """Tests every backend must pass. `tolerance` is the max relative error allowed."""

    tolerance = 1e-4

    @pytest.fixture(scope="class")
    def model_bytes(self) -> bytes:
        return two_input_model(seed=CONTRACT_SEED)

    @pytest.fixture
    def backend(self, model_bytes: bytes) -> Backend:  # pragma: no cover - overridden
        raise NotImplementedError

    @staticmethod
    def batch(rows: int, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {"image": rng.standard_normal((rows, 3, 4, 4)).astype(np.float32),
                "meta": rng.standard_normal((rows, 8)).astype(np.float32)}

    def test_metadata(self, backend: Backend) -> None:
        inputs = {m.name: m for m in backend.inputs}
        outputs = {m.name: m for m in backend.outputs}
        assert sorted(inputs) == ["image", "meta"]
        assert sorted(outputs) == ["logits", "score"]
        assert inputs["image"].dtype == np.float32
        assert inputs["image"].row_shape == (3, 4, 4)
        assert inputs["meta"].row_shape == (8,)
        assert outputs["logits"].row_shape == (5,)
        assert outputs["score"].row_shape == (1,)

    @pytest.mark.parametrize("rows", [1, 7, 64])
    def test_round_trip(self, backend: Backend, model_bytes: bytes, rows: int) -> None:
        batch = self.batch(rows, seed=rows)
        got = backend.infer(batch)
        want = reference(model_bytes, batch["image"], batch["meta"])
        for name in ("logits", "score"):
            assert got[name].shape == want[name].shape
            assert got[name].dtype == np.float32
            scale = np.abs(want[name]).max()
            assert np.abs(got[name] - want[name]).max() <= self.tolerance * max(scale, 1.0)

    def test_batches_are_independent(self, backend: Backend) -> None:
        big = self.batch(16, seed=1)
        whole = backend.infer(big)
        half = backend.infer({k: v[:8] for k, v in big.items()})
        np.testing.assert_allclose(half["logits"], whole["logits"][:8], rtol=1e-5, atol=1e-5)

    def test_wrong_dtype(self, backend: Backend) -> None:
        batch = self.batch(4, seed=2)
        batch["meta"] = batch["meta"].astype(np.float64)
        with pytest.raises(DataError, match=r"input 'meta' got float64, the model wants float32 \[N,8\]"):
            backend.infer(batch)

    def test_wrong_shape(self, backend: Backend) -> None:
        batch = self.batch(4, seed=2)
        batch["image"] = batch["image"].reshape(4, 3, 16)
        with pytest.raises(DataError, match=r"input 'image' got shape \[4, 3, 16\]"):
            backend.infer(batch)

    def test_missing_input(self, backend: Backend) -> None:
        batch = self.batch(4, seed=2)
        del batch["meta"]
        with pytest.raises(DataError, match=r"batch is missing model input\(s\) \['meta'\]"):
            backend.infer(batch)

    def test_unknown_input(self, backend: Backend) -> None:
        batch = self.batch(4, seed=2)
        batch["extra"] = batch["meta"]
        with pytest.raises(DataError, match=r"batch has \['extra'\], which the model has no input for"):
            backend.infer(batch)

    def test_mismatched_rows(self, backend: Backend) -> None:
        batch = self.batch(4, seed=2)
        batch["meta"] = batch["meta"][:3]
        with pytest.raises(DataError, match="input 'meta' has 3 rows, other inputs have 4"):
            backend.infer(batch)

    def test_closed_backend_refuses(self, backend: Backend) -> None:
        backend.close()
        backend.close()  # idempotent
        with pytest.raises(BackendError, match="backend is not loaded"):
            backend.infer(self.batch(2, seed=3))
