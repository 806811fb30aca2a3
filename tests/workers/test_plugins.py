"""Plugin libraries (`--plugins`): digests, fetching with the hash checked, ONNX Runtime custom ops.

The ONNX Runtime tests load a real custom-op library, onnxruntime-extensions'
(`onnxruntime_extensions.get_library_path()`), and run its `NegPos` operator. TensorRT plugin
registration runs where TensorRT does (tests/backends/test_tensorrt.py) and is checked against
the real bindings in tests/backends/test_trt_bindings.py.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

import fsspec
import numpy as np
import pytest
from onnx import TensorProto, helper

from workers.backends import BackendConfig, create_backend
from workers.errors import BackendError, SpecError
from workers.plugins import digest_plugins, local_plugin_files

ortx = pytest.importorskip("onnxruntime_extensions",
                           reason="onnxruntime-extensions (a custom-op library) is not installed")


def negpos_model() -> bytes:
    """x [N,4] -> NegPos (ai.onnx.contrib, from onnxruntime-extensions) -> neg, pos."""
    node = helper.make_node("NegPos", ["x"], ["neg", "pos"], domain="ai.onnx.contrib")
    graph = helper.make_graph(
        [node], "negpos", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("neg", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("pos", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.onnx.contrib", 1)])
    model.ir_version = 8
    return model.SerializeToString()


def test_digests_and_local_files(tmp_path: Path) -> None:
    lib = tmp_path / "libplugin.so"
    lib.write_bytes(b"\x7fELF not really a library")
    sha = hashlib.sha256(lib.read_bytes()).hexdigest()
    assert digest_plugins([str(lib)]) == ((str(lib), sha),)
    # A local path is used in place; anything else is fetched into a private directory.
    assert local_plugin_files(((str(lib), sha),)) == [str(lib)]
    with fsspec.open("memory://plugins/libremote.so", "wb") as f:
        f.write(b"remote bytes")
    remote = digest_plugins(["memory://plugins/libremote.so"])
    [path] = local_plugin_files(remote)
    assert Path(path).read_bytes() == b"remote bytes" and path.endswith("-libremote.so")
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700


def test_a_changed_or_missing_library_is_refused(tmp_path: Path) -> None:
    lib = tmp_path / "libplugin.so"
    lib.write_bytes(b"version 1")
    plugins = digest_plugins([str(lib)])
    lib.write_bytes(b"version 2")
    with pytest.raises(BackendError, match=re.escape(
            f"plugin library '{lib}' changed since the job started (sha256 ")):
        local_plugin_files(plugins)
    with pytest.raises(SpecError, match=re.escape(
            f"plugin library '{tmp_path / 'nope.so'}' cannot be read (")):
        digest_plugins([str(tmp_path / "nope.so")])


def test_onnxruntime_loads_custom_op_libraries() -> None:
    model = negpos_model()
    x = np.random.default_rng(3).standard_normal((6, 4)).astype(np.float32)
    plugins = digest_plugins([ortx.get_library_path()])
    with create_backend("onnxruntime", model, BackendConfig(device="cpu", plugins=plugins)) as b:
        out = b.infer({"x": x})
    np.testing.assert_array_equal(out["neg"], np.minimum(x, 0))
    np.testing.assert_array_equal(out["pos"], np.maximum(x, 0))
    with pytest.raises(BackendError, match="NegPos"):
        create_backend("onnxruntime", model, BackendConfig(device="cpu")).load()


def test_plugins_in_the_spec_and_the_fingerprint(tmp_path: Path) -> None:
    import dataclasses

    from jobs.plan_cache import PlanKey
    from jobs.spec import spec_from_args, spec_from_settings
    from workers.plan_build import BuildConfig

    spec = spec_from_args(["--model", "m.onnx", "--input", "in", "--output", "out",
                           "--plugins", "a.so", "--plugins", "s3://b/b.so"])
    assert spec.plugins == ("a.so", "s3://b/b.so")
    assert spec_from_settings({"model": "m.onnx", "input": "i", "output": "o",
                               "plugins": ["a.so"]}).plugins == ("a.so",)
    with pytest.raises(SpecError, match="plugins in settings must be a list of library paths"):
        spec_from_settings({"model": "m.onnx", "input": "i", "output": "o", "plugins": "a.so"})
    key = PlanKey("a" * 64, (), "10.13.0.35", 12, "sm_90", BuildConfig())
    with_lib = dataclasses.replace(key, build=BuildConfig(plugins=(("a.so", "1" * 64),)))
    other_lib = dataclasses.replace(key, build=BuildConfig(plugins=(("a.so", "2" * 64),)))
    assert len({key.fingerprint, with_lib.fingerprint, other_lib.fingerprint}) == 3


@pytest.mark.ray
def test_a_job_with_a_custom_op_library(ray_cluster: None, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.driver import run_job
    from jobs.spec import spec_from_args

    model = tmp_path / "negpos.onnx"
    model.write_bytes(negpos_model())
    x = np.random.default_rng(4).standard_normal((300, 4)).astype(np.float32)
    data = tmp_path / "in"
    data.mkdir()
    pq.write_table(pa.table({"uid": np.arange(300), "x": pa.FixedSizeListArray.from_arrays(
        pa.array(x.ravel()), 4)}), data / "part-0.parquet", row_group_size=100)
    out = tmp_path / "out"
    report = run_job(spec_from_args([
        "--model", str(model), "--input", str(data), "--output", str(out), "--keep", "uid",
        "--plugins", ortx.get_library_path(), "--backend", "onnxruntime", "--workers", "1",
        "--no-progress"]))
    assert report.exit_code == 0
    table = pq.read_table(out).sort_by("uid")
    pos = np.stack(table.column("pos").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(pos.reshape(300, 4), np.maximum(x, 0))
