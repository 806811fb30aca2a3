"""Caffe models in: `deploy.prototxt` + `net.caffemodel` converted to ONNX once, in the driver.

TensorRT 10 removed its Caffe parser. The converter is caffe2onnx 2.0.1 (35 layer types, its
own namespaced package; caffe-onnx, the other candidate, installs top-level `src` and `proto`
packages and pins protobuf<4; docs/tensorrt.md says more). Two things about it shape this module:

- Its generated protobuf classes predate protoc 3.19, and protobuf 4+ refuses to load them
  except with the pure-Python implementation (PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python),
  which must be chosen before protobuf is first imported and would slow every other protobuf
  user of the process (onnx). So the conversion runs in a subprocess (`python -m jobs.caffe`),
  with that setting, and hands back ONNX bytes.
- It pins onnx==1.6.0, which no Python of today installs; it runs on current onnx and is
  installed without its dependencies: `pip install --no-deps caffe2onnx==2.0.1`.

After the conversion the model is finished here: the opset it was written for (11, that of onnx
1.6) is declared, initializers leave the graph inputs, the input takes the Caffe blob's name
(`data`, not the converter's `data_input`), and the batch dimension becomes dynamic
(a deploy.prototxt fixes a batch, usually 1, and a plan or a batch of 256 needs it free). The
result is deterministic, so the same Caffe files give the same ONNX bytes, job identity and plan
fingerprint.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from importlib import metadata

from workers.errors import MissingDependencyError, SpecError

CONVERTER = "caffe2onnx"
#: The ONNX opset caffe2onnx 2.0.1 builds its nodes for (it pins onnx 1.6.0, whose opset is 11).
CONVERTER_OPSET = 11
INSTALL_HINT = ("pip install --no-deps caffe2onnx==2.0.1 (without its dependencies: its onnx==1.6.0 "
                "pin predates every onnx that installs today, and it runs on this project's)")
TIMEOUT_S = 600.0


def converter_version() -> str:
    try:
        return f"{CONVERTER} {metadata.version(CONVERTER)}"
    except metadata.PackageNotFoundError:
        return f"{CONVERTER} missing"


def convert_caffe(prototxt: bytes, caffemodel: bytes, source: str = "the Caffe model") -> bytes:
    """ONNX bytes for a Caffe `deploy.prototxt` and its `net.caffemodel`, batch dimension dynamic.

    Raises SpecError naming the layer and its type when the converter cannot handle one, and
    MissingDependencyError, with the install line, without the converter.
    """
    if importlib.util.find_spec(CONVERTER) is None:
        raise MissingDependencyError(f"{source} is a Caffe model, and converting it needs "
                                     f"{CONVERTER}: {INSTALL_HINT}")
    with tempfile.TemporaryDirectory(prefix="caffe-") as tmp:
        paths = [os.path.join(tmp, name) for name in ("deploy.prototxt", "net.caffemodel",
                                                      "model.onnx")]
        for path, data in zip(paths, (prototxt, caffemodel), strict=False):
            with open(path, "wb") as f:
                f.write(data)
        env = {**os.environ, "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            done = subprocess.run([sys.executable, "-m", "jobs.caffe", *paths], env=env,
                                  capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise SpecError(f"converting {source} to ONNX took more than {TIMEOUT_S:.0f}s; "
                            "convert it offline (python -m caffe2onnx.convert) and pass the "
                            "ONNX model") from exc
        report = _report(done)
        if "error" in report:
            raise SpecError(_error_text(report, source))
        with open(paths[2], "rb") as f:
            converted = f.read()
    return finish(converted, source)


def _report(done: subprocess.CompletedProcess[str]) -> dict[str, str]:
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if lines:
        result: dict[str, str] = json.loads(lines[-1])
        return result
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"error": "the converter failed: " + " | ".join(tail) if tail else
            f"the converter exited with status {done.returncode}"}


def _error_text(report: dict[str, str], source: str) -> str:
    where = ""
    if report.get("layer"):
        where = f" at layer '{report['layer']}'" + (f" (type {report['type']})"
                                                    if report.get("type") else "")
    return (f"{converter_version()} cannot convert {source}{where}: {report['error']}; "
            "replace the layer with ones it supports, or convert the model to ONNX another way "
            "and pass it with --model")


def finish(data: bytes, source: str) -> bytes:
    """The converter's model with its opset declared, weights out of the inputs, batch dynamic."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load_model_from_string(data)
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", CONVERTER_OPSET))
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    graph = model.graph
    weights = {init.name for init in graph.initializer}
    inputs = [v for v in graph.input if v.name not in weights]
    del graph.input[:]
    graph.input.extend(inputs)
    batches = {v.type.tensor_type.shape.dim[0].dim_value for v in inputs
               if v.type.tensor_type.shape.dim}
    # Shapes the converter wrote for its fixed batch; onnx re-infers them when needed.
    del graph.value_info[:]
    for value in [*graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "N"
    # The converter names the input after the Caffe blob plus "_input"; the blob's own name is
    # the one a user knows from the prototxt (and maps with --column data=COLUMN).
    used = {name for node in graph.node for name in (*node.input, *node.output)} | weights
    for value in graph.input:
        plain = value.name[: -len("_input")] if value.name.endswith("_input") else ""
        if plain and plain not in used:
            for node in graph.node:
                for i, name in enumerate(node.input):
                    if name == value.name:
                        node.input[i] = plain
            value.name = plain
    # Reshape targets that spell the batch out ([1, 800]) keep the input's batch instead (0).
    shapes = {node.input[1] for node in graph.node if node.op_type == "Reshape"}
    for init in graph.initializer:
        if init.name in shapes:
            target = numpy_helper.to_array(init).copy()
            if target.size and int(target[0]) in batches:
                target[0] = 0
                init.CopyFrom(numpy_helper.from_array(target, init.name))
    model.producer_name = converter_version()
    # The converter names the graph after its output file (a temporary path here).
    graph.name = "caffe"
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # onnx raises ValidationError / InferenceError
        raise SpecError(f"{converter_version()} converted {source} to an ONNX model that does not "
                        f"check ({exc.__class__.__name__}: {exc}); convert the model to ONNX "
                        "another way and pass it with --model") from exc
    return bytes(model.SerializeToString())


# ---------------------------------------------------------------------------------------------
# The subprocess (pure-Python protobuf, for the converter's generated classes)


def _layer_types(net: object) -> dict[str, str]:
    layers = list(getattr(net, "layer", [])) or list(getattr(net, "layers", []))
    return {str(layer.name): str(layer.type) for layer in layers}


def _convert_main(prototxt: str, caffemodel: str, out: str) -> dict[str, str]:
    from caffe2onnx.proto import caffe_upsample_pb2 as caffe_pb2
    from caffe2onnx.src.caffe2onnx import Caffe2Onnx
    from google.protobuf import text_format

    net = caffe_pb2.NetParameter()
    try:
        with open(prototxt) as f:
            text_format.Merge(f.read(), net)
    except text_format.ParseError as exc:
        return {"error": f"the prototxt does not parse as a Caffe NetParameter ({exc})"}
    params = caffe_pb2.NetParameter()
    try:
        with open(caffemodel, "rb") as f:
            params.ParseFromString(f.read())
    except Exception as exc:  # protobuf's DecodeError
        return {"error": f"the caffemodel does not parse as a Caffe NetParameter ({exc})"}
    types = _layer_types(net)
    said = io.StringIO()
    try:
        # The converter prints a line per layer and, for a layer it lacks, exits.
        with contextlib.redirect_stdout(said):
            model = Caffe2Onnx(net, params, out).createOnnxModel()
    except (Exception, SystemExit) as exc:
        converted = re.findall(r"^convert layer: (.*)$", said.getvalue(), flags=re.MULTILINE)
        layer = converted[-1] if converted else ""
        unsupported = re.search(r"Failed type not support: (.*)$", said.getvalue(), re.MULTILINE)
        if unsupported:
            why = f"it has no conversion for layer type {unsupported.group(1).strip()}"
        elif isinstance(exc, SystemExit):
            why = said.getvalue().strip().splitlines()[-1] if said.getvalue().strip() else "exit"
        else:
            why = f"{exc.__class__.__name__}: {exc}"
        return {"error": why, "layer": layer, "type": types.get(layer, "")}
    with open(out, "wb") as f:
        f.write(model.SerializeToString())
    return {"ok": out}


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit("usage: python -m jobs.caffe DEPLOY.prototxt NET.caffemodel OUT.onnx")
    print(json.dumps(_convert_main(*sys.argv[1:])), flush=True)
