"""`python -m jobs.plan`: inspect without TensorRT, and every error a user can meet before a build."""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from jobs.plan import main
from tests.models import two_input_model


def tensorrt_installed() -> bool:
    try:
        return hasattr(importlib.import_module("tensorrt"), "Builder")
    except ImportError:
        return False


no_tensorrt = pytest.mark.skipif(tensorrt_installed(), reason="TensorRT is installed here")


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    out = io.StringIO()
    code = main(argv, out)
    return code, out.getvalue(), capsys.readouterr().err


def model_with(inputs: list[tuple[str, list[object]]]) -> bytes:
    """Relu over each input: a real model whose input shapes are as given."""
    nodes = [helper.make_node("Relu", [name], [f"{name}_out"]) for name, _ in inputs]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(f"{n}_out", TensorProto.FLOAT, s) for n, s in inputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="test", producer_version="1.0")
    return model.SerializeToString()


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "two_input.onnx"
    two_input_model(str(path), seed=2)
    return path


def test_inspect_onnx_text(model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["inspect", str(model_path)], capsys)
    assert code == 0 and err == ""
    assert out.splitlines() == [
        f"model: {model_path} (ONNX, {model_path.stat().st_size:,} bytes)",
        "ir_version: 8",
        "opsets: ai.onnx 17",
        "producer: tests.models",
        "inputs:",
        "  image  float32 [N,3,4,4]",
        "  meta   float32 [N,8]",
        "outputs:",
        "  logits  float32 [N,5]",
        "  score   float32 [N,1]",
        "types: fp32",
    ]


def test_inspect_onnx_json(model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["inspect", str(model_path), "--json"], capsys)
    summary = json.loads(out)
    assert code == 0 and summary["format"] == "onnx" and summary["ir_version"] == 8
    assert summary["opsets"] == {"ai.onnx": 17}
    assert summary["inputs"] == [{"name": "image", "dtype": "float32", "shape": [None, 3, 4, 4]},
                                 {"name": "meta", "dtype": "float32", "shape": [None, 8]}]
    assert summary["float_types"] == ["fp32"] and summary["quantized"] == []


def test_inspect_names_external_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ext.onnx"
    onnx.save_model(onnx.load_model_from_string(two_input_model()), str(path),
                    save_as_external_data=True, location="ext.weights", size_threshold=0)
    code, out, _ = run(["inspect", str(path)], capsys)
    assert code == 0 and out.splitlines()[-1] == "external data: ext.weights"


def test_inspect_reports_quantization(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.workers.test_onnx_precision import qdq_model

    path = tmp_path / "q.onnx"
    path.write_bytes(qdq_model(TensorProto.INT8, 17))
    code, out, _ = run(["inspect", str(path)], capsys)
    assert code == 0 and "types: fp32; quantized (Q/DQ): int8" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["inspect", "{missing}"], "cannot read '{missing}': not found"),
    (["inspect", "{model}", "--weights", "{missing}"], "cannot read '{missing}': not found"),
    (["build", "{model}", "-o", "{out}", "--workspace", "4x"],
     "--workspace must be a size in bytes such as 4294967296, 4GiB or 512MiB, got '4x'"),
    (["build", "{model}", "-o", "{out}", "--max-batch", "0"], "--max-batch must be >= 1, got 0"),
    (["build", "{model}", "-o", "{out}", "--max-batch", "8", "--opt-batch", "16"],
     "batch sizes must satisfy --min-batch <= --opt-batch <= --max-batch, got 1 <= 16 <= 8"),
    (["build", "{model}", "-o", "{out}", "--optimization-level", "7"],
     "optimization_level must be an integer from 0 to 5, got 7"),
    (["build", "{model}", "-o", "{out}", "--exclude-lean-runtime"],
     "exclude_lean_runtime only applies to version-compatible plans"),
    (["build", "{model}", "-o", "{out}", "--precision", "int8"],
     "precision int8 needs a model with explicit quantization (QuantizeLinear/DequantizeLinear "
     "nodes producing int8), and model '{model}' has none"),
    (["build", "{fixed}", "-o", "{out}", "--max-batch", "64"],
     "model '{fixed}' input 'x' has a fixed batch dimension of 1 (float32 [1,3,8,8]), but the "
     "plan is built for batches of up to 64 rows"),
    (["build", "{dynamic}", "-o", "{out}"],
     "model '{dynamic}' input 'x' is float32 [N,3,?,?]: dimensions beyond the batch are dynamic"),
])
def test_errors_before_tensorrt(argv: list[str], message: str, tmp_path: Path, model_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    fixed, dynamic = tmp_path / "fixed.onnx", tmp_path / "dynamic.onnx"
    fixed.write_bytes(model_with([("x", [1, 3, 8, 8])]))
    dynamic.write_bytes(model_with([("x", ["N", 3, "H", "W"])]))
    names = {"model": str(model_path), "missing": str(tmp_path / "nope.onnx"),
             "out": str(tmp_path / "m.plan"), "fixed": str(fixed), "dynamic": str(dynamic)}
    code, out, err = run([a.format(**names) for a in argv], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message.format(**names) in err
    assert not (tmp_path / "m.plan").exists()


@no_tensorrt
def test_build_without_tensorrt_says_how_to_install(model_path: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["build", str(model_path), "-o", str(tmp_path / "m.plan")], capsys)
    assert code == 2
    assert err == ("error: TensorRT is not installed; building a plan needs the full package: "
                   "pip install '.[tensorrt-cu12]' or '.[tensorrt-cu13]' on the node that "
                   "builds, or set backend: onnxruntime\n")


@no_tensorrt
def test_inspect_plan_without_tensorrt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "model.plan"
    plan.write_bytes(np.random.default_rng(0).bytes(512))
    code, _, err = run(["inspect", str(plan)], capsys)
    assert code == 2 and re.search(
        r"'.*model\.plan' is not an ONNX model, so it is read as a TensorRT plan, which needs "
        r"TensorRT \(TensorRT is not installed; .*\); or inspect the ONNX model it was built from",
        err)
    # With a sidecar (as `build` writes one), the plan is described from it.
    sidecar = {"format": 1, "fingerprint": "f" * 64, "created": "2026-01-01T00:00:00+00:00",
               "key": {"tensorrt": "10.13.0.35", "target": "sm_90",
                       "build": {"precision": "fp16", "profiles": [[1, 64, 64]]}},
               "gpu": "NVIDIA H100", "build_seconds": 12.5, "precision_how": "BuilderFlag.FP16",
               "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 8]}],
               "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 2]}]}
    (tmp_path / "model.plan.json").write_text(json.dumps(sidecar))
    code, out, _ = run(["inspect", str(plan)], capsys)
    assert code == 0
    assert "built: TensorRT 10.13.0.35 for sm_90 on NVIDIA H100 in 12.5s" in out
    assert "precision: fp16 (BuilderFlag.FP16)" in out and "  x  float32 [?,8]" in out
    assert out.rstrip().endswith("(from the sidecar: TensorRT is not installed here)")
    code, _, err = run(["inspect", str(plan), "--layers"], capsys)
    assert code == 2 and "needs TensorRT" in err


@pytest.mark.subprocess
def test_module_entry_point(model_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "jobs.plan", "inspect", str(model_path)],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "  image  float32 [N,3,4,4]" in done.stdout
    done = subprocess.run([sys.executable, "-m", "jobs.plan", "inspect", "/no/such.onnx"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 2 and done.stderr.startswith("error: cannot read '/no/such.onnx'")



# onnx2trt's options -------------------------------------------------------------------------
def test_layers_of_an_onnx_model_with_shapes(model_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """onnx2trt -l: every node, its operator and its outputs' shapes, no TensorRT needed."""
    code, out, _ = run(["inspect", str(model_path), "--layers"], capsys)
    assert code == 0
    assert "layers (6):" in out
    assert "  0: (unnamed)  [Flatten]  -> flat float32 [N,48]" in out
    assert "  5: (unnamed)  [ReduceSum]  -> score float32 [N,1]" in out


def test_model_as_text_with_and_without_weights(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """onnx2trt -t / -T: the ONNX text syntax, weights left out or written."""
    from tests.models import two_input_model

    model = tmp_path / "m.onnx"
    model.write_bytes(two_input_model())
    code, out, _ = run(["inspect", str(model), "-t", "-"], capsys)
    assert code == 0
    assert 'float[48,5] w1 = ["location": "(weights left out)"]' in out
    assert "logits = Add (am, b)" in out
    assert run(["inspect", str(model), "-T", str(tmp_path / "m.txt")], capsys)[0] == 0
    text = (tmp_path / "m.txt").read_text()
    assert "(weights left out)" not in text
    # With its weights, the text parses back into the same model.
    import onnx

    original = onnx.load_model_from_string(two_input_model())
    parsed = onnx.parser.parse_model(text)
    assert [n.op_type for n in parsed.graph.node] == [n.op_type for n in original.graph.node]
    for got, want in zip(parsed.graph.initializer, original.graph.initializer, strict=True):
        np.testing.assert_allclose(onnx.numpy_helper.to_array(got),
                                   onnx.numpy_helper.to_array(want), rtol=1e-6)


def test_text_of_a_plan_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"\x00 not onnx")
    code, _, err = run(["inspect", str(plan), "-t", "-"], capsys)
    assert code == 2 and "--text writes an ONNX model as text, and" in err


def test_versions(capsys: pytest.CaptureFixture[str]) -> None:
    """onnx2trt -V: ONNX IR version and opset, TensorRT (or its absence), the converters."""
    import onnx

    code, out, _ = run(["-V"], capsys)
    assert code == 0
    assert out.startswith(f"onnx {onnx.__version__}: IR version {onnx.IR_VERSION}, opset "
                          f"{onnx.defs.onnx_opset_version()}\n")
    assert "fp16/bf16 conversion: onnxconverter-common" in out
    assert "tensorrt" in out


def test_a_command_or_version_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run([], capsys)
    assert "a command is required: inspect or build (or -V)" in capsys.readouterr().err
