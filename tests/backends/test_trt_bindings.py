"""Our TensorRT code against the real bindings of TensorRT 10.13 and 11.4, full and lean.

`.ci/trt_bindings.py build/trt-bindings` installs the pybind11 modules from PyPI and stub
libraries for them (TensorRT's own libraries cannot be downloaded here); each set is imported in
a subprocess running `tests.backends.trt_probe`, which checks every name and parameter our code
uses and runs what needs no GPU. Skipped, saying why, where the bindings were not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BINDINGS = Path(os.environ.get("TRT_BINDINGS", ROOT / "build" / "trt-bindings"))
SETS = {"trt10": "10.13.0.35", "trt11": "11.4.0.106", "lean10": "10.13.0.35",
        "lean11": "11.4.0.106"}
pytestmark = [pytest.mark.subprocess, pytest.mark.skipif(
    not (BINDINGS / "stub").is_dir(),
    reason=f"no TensorRT bindings in {BINDINGS}; python .ci/trt_bindings.py {BINDINGS}")]


def probe(name: str) -> dict[str, Any]:
    env = {**os.environ, "LD_LIBRARY_PATH": str(BINDINGS / "stub"),
           "PYTHONPATH": os.pathsep.join([str(BINDINGS / name), str(ROOT)])}
    done = subprocess.run([sys.executable, "-m", "tests.backends.trt_probe"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.fixture(scope="module", params=sorted(SETS))
def bindings(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param, probe(request.param)


def test_every_name_and_parameter_we_use_exists(bindings: tuple[str, dict[str, Any]]) -> None:
    name, found = bindings
    assert found["version"] == SETS[name]
    assert found["problems"] == []


def test_our_code_runs_against_the_real_module(bindings: tuple[str, dict[str, Any]]) -> None:
    name, found = bindings
    facts = found["facts"]
    lean = name.startswith("lean")
    assert found["module"] == ("tensorrt_lean" if lean else "tensorrt")
    assert facts["import_tensorrt"] == found["module"]
    assert facts["dtypes"] == {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16",
                               "INT8": "int8", "INT32": "int32", "INT64": "int64", "BOOL": "bool"}
    # One logger per process, and each capture sees its own messages (errors and warnings).
    assert facts["one_logger"]
    assert facts["captured"] == {"warnings": ["a warning"], "errors": ["an error"]}
    assert facts["runtime_arguments"] == "accepted"
    assert facts["register_no_libraries"] == []
    assert facts["register_library"] == (f"{found['module']} has no plugin registry here; the "
                                         "plugin libraries cannot be loaded")  # the stub's NULL
    if lean:
        assert not facts["full"] and not facts["init_libnvinfer_plugins"]
        assert "tensorrt_lean is installed: it runs plans but cannot build them" in (
            facts["import_tensorrt_builder"])
    else:
        assert facts["builder_arguments"] == "accepted"
        assert facts["init_plugins_returns"] is False  # the stub registers nothing
        assert facts["precision_flags"] is (name == "trt10")  # TensorRT 11 removed them
        assert facts["strongly_typed_flag"]


def test_layers_need_the_engine_inspector(bindings: tuple[str, dict[str, Any]]) -> None:
    name, found = bindings
    if name.startswith("lean"):
        assert found["facts"]["layers"] == (
            f"--layers lists a plan's layers with TensorRT's EngineInspector, which tensorrt_lean "
            f"{SETS[name]} (a runtime-only package) does not have; install the full package here "
            "(pip install '.[tensorrt-cu12]' or '.[tensorrt-cu13]'), or drop --layers")
    else:
        assert found["facts"]["layers"] == "ok"
