"""Issue 17, point 3: a model cannot make a backend read files outside its own directory.

ONNX tensors may keep their bytes in an external file named by `location`. ONNX Runtime,
given a model's bytes, resolved those names against the actor's working directory: a model
with `location: secret.txt` put that file into an output column. The TensorRT path checked
initializers only, not tensors held by Constant nodes. Every reference (initializers, sparse
initializers, tensor attributes of any node, subgraphs, functions) is now checked on both
backends: a relative path inside the directory of a model given by path or URI, and nothing
for a model given as bytes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tomllib
from onnx import TensorProto, helper, numpy_helper

from jobs.driver import prepare, run_job
from tests.faults.helpers import REPO, spec_for
from workers.backends import BackendConfig, create_backend
from workers.errors import SpecError
from workers.plan_build import external_data_locations

SECRET = b"TOP-SECRET-BYTES"  # 16 bytes: four float32 values


def external(name: str, location: str, shape: tuple[int, ...] = (4,)) -> TensorProto:
    """A float32 tensor whose bytes live in the file `location`."""
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"),
                       ("length", str(4 * int(np.prod(shape))))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def io() -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    return ([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])


def model(graph: onnx.GraphProto) -> bytes:
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto.SerializeToString()


def initializer_model(location: str) -> bytes:
    """y = x + w, w an external initializer."""
    inputs, outputs = io()
    return model(helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", inputs,
                                   outputs, [external("w", location)]))


def constant_model(location: str) -> bytes:
    """y = x + w, w the value of a Constant node."""
    inputs, outputs = io()
    nodes = [helper.make_node("Constant", [], ["w"], name="leak", value=external("w", location)),
             helper.make_node("Add", ["x", "w"], ["y"])]
    return model(helper.make_graph(nodes, "g", inputs, outputs))


def subgraph_model(location: str) -> bytes:
    """y = If(true) then x + w (w a Constant in the branch) else x."""
    inputs, outputs = io()
    then = helper.make_graph(
        [helper.make_node("Constant", [], ["w"], value=external("w", location)),
         helper.make_node("Add", ["x", "w"], ["t"])], "then", [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 4])])
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])], "else", [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 4])])
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True))),
             helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    return model(helper.make_graph(nodes, "g", inputs, outputs))


MODELS: dict[str, Callable[[str], bytes]] = {"initializer": initializer_model,
                                             "constant": constant_model,
                                             "subgraph": subgraph_model}
WHERE = {"initializer": "initializer 'w'", "constant": "Constant node 'leak'",
         "subgraph": "Constant node in subgraph 'then'"}


@pytest.fixture
def in_secret_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The actor's working directory holds secret.txt; its parent holds another."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "secret.txt").write_bytes(SECRET)
    (tmp_path / "secret.txt").write_bytes(SECRET)
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("location", ["secret.txt", "../secret.txt"])
def test_onnxruntime_refuses_external_data_of_a_model_given_as_bytes(
        in_secret_dir: Path, kind: str, location: str) -> None:
    backend = create_backend("onnxruntime", MODELS[kind](location), BackendConfig(device="cpu"))
    with pytest.raises(SpecError, match=re.escape(
            f"keeps tensor 'w' ({WHERE[kind]}) in the external file '{location}', and it was "
            "given as bytes, with no directory to hold that file")), backend:
        out = backend.infer({"x": np.zeros((1, 4), np.float32)})["y"]
        pytest.fail(f"the model read {out.tobytes()!r}")  # what the finding saw


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize(("location", "why"), [
    ("../secret.txt", "which leaves the model's directory"),
    ("/etc/hostname", "which is not a relative path"),
    ("sub/../../secret.txt", "which leaves the model's directory"),
    ("*/_ORT_MEM_ADDR_/*", "which holds characters a file name here may not"),
    ("s3://bucket/key", "which holds characters a file name here may not"),
    ("", "which is empty"),
])
def test_plan_builds_check_every_reference(kind: str, location: str, why: str) -> None:
    with pytest.raises(SpecError, match=re.escape(
            f"model keeps tensor 'w' ({WHERE[kind]}) in the external file '{location}', {why}")):
        external_data_locations(MODELS[kind](location))


def test_a_symlink_out_of_the_model_directory_is_refused(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (tmp_path / "secret.txt").write_bytes(SECRET)
    os.symlink(tmp_path / "secret.txt", models / "weights.bin")
    (models / "m.onnx").write_bytes(initializer_model("weights.bin"))
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(
        pa.array(np.zeros(8, np.float32)), 4)}), data / "a.parquet")
    with pytest.raises(SpecError, match=re.escape(
            f"model '{models / 'm.onnx'}' keeps tensor 'w' (initializer 'w') in the external "
            f"file 'weights.bin', which resolves to '{tmp_path / 'secret.txt'}', outside the "
            "model's directory")):
        prepare(spec_for(str(models / "m.onnx"), str(data), str(tmp_path / "out"),
                         columns=(), keep=()))


@pytest.mark.ray
@pytest.mark.parametrize("kind", ["initializer", "constant"])
def test_onnxruntime_jobs_read_external_data_from_the_models_directory(
        ray_cluster: None, in_secret_dir: Path, tmp_path: Path, kind: str) -> None:
    """The supported case: weights beside the model, read by the driver, given to the actors."""
    weights = np.array([1.5, -2.0, 3.25, 0.5], np.float32)
    models = tmp_path / "models"
    models.mkdir()
    (models / "weights.bin").write_bytes(weights.tobytes())
    (models / "m.onnx").write_bytes(MODELS[kind]("weights.bin"))
    data = tmp_path / "data"
    data.mkdir()
    x = np.random.default_rng(5).standard_normal((300, 4)).astype(np.float32)
    pq.write_table(pa.table({"uid": np.arange(300), "x": pa.FixedSizeListArray.from_arrays(
        pa.array(x.reshape(-1)), 4)}), data / "a.parquet", row_group_size=100)
    out = tmp_path / "out"
    report = run_job(spec_for(str(models / "m.onnx"), str(data), str(out), columns=(),
                              keep=("uid",), rows_per_shard=100))
    assert report.exit_code == 0, report.failed
    table = pq.read_table(out).sort_by("uid")
    assert np.allclose(table.column("y").combine_chunks().to_numpy_ndarray(), x + weights)


@pytest.mark.ray
def test_a_job_with_a_planted_location_fails_before_any_actor(
        ray_cluster: None, in_secret_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "m.onnx").write_bytes(constant_model("../secret.txt"))
    with pytest.raises(SpecError, match=re.escape(
            "keeps tensor 'w' (Constant node 'leak') in the external file '../secret.txt', "
            "which leaves the model's directory")):
        run_job(spec_for(str(models / "m.onnx"), str(tmp_path), str(tmp_path / "out"),
                         columns=(), keep=()))


def test_onnxruntime_floor_has_its_own_path_checks() -> None:
    """ONNX Runtime 1.25 is the first that refuses '..', absolute and symlinked external data of
    a model loaded from bytes (1.24.4 only '..' and absolute; 1.23 none: measured)."""
    project = tomllib.loads((Path(REPO) / "pyproject.toml").read_text())["project"]
    floors = [d for d in project["dependencies"] + project["optional-dependencies"]["gpu"]
              if d.startswith("onnxruntime")]
    assert sorted(floors) == ["onnxruntime-gpu>=1.25", "onnxruntime>=1.25"]
    assert tuple(int(p) for p in version("onnxruntime").split(".")[:2]) >= (1, 25)
