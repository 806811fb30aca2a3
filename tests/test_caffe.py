"""Caffe models: deploy.prototxt + net.caffemodel converted to ONNX in the driver (jobs/caffe.py).

The LeNet example (`examples.lenet`, built with the converter's own Caffe protobuf classes) is
converted with caffe2onnx and run as a job on ONNX Runtime, against a numpy implementation of the
same network with the same weights.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest

from examples.lenet import LABELS, digits_28, forward
from jobs.spec import JobSpec, spec_from_args
from workers.errors import SpecError

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.subprocess, pytest.mark.skipif(
    __import__("importlib").util.find_spec("caffe2onnx") is None,
    reason="caffe2onnx is not installed (pip install --no-deps caffe2onnx==2.0.1)")]


@pytest.fixture(scope="module")
def lenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lenet")
    subprocess.run([sys.executable, "-m", "examples.lenet", str(out)], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def converted(lenet: Path) -> bytes:
    from jobs.caffe import convert_caffe

    return convert_caffe((lenet / "deploy.prototxt").read_bytes(),
                         (lenet / "net.caffemodel").read_bytes())


def test_converted_lenet_matches_numpy(lenet: Path, converted: bytes) -> None:
    proto = onnx.load_model_from_string(converted)
    [image] = proto.graph.input
    assert image.name == "data"  # the Caffe blob's name
    dims = image.type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    assert [o.name for o in proto.graph.output] == ["prob"]
    weights = dict(np.load(lenet / "weights.npz"))
    images, labels = digits_28()
    session = ort.InferenceSession(converted, providers=["CPUExecutionProvider"])
    for rows in (1, 37, 256):  # any batch: the deploy file's batch of 1 is dynamic now
        got = session.run(None, {"data": images[:rows]})[0]
        np.testing.assert_allclose(got, forward(weights, images[:rows]), atol=1e-5)
    assert (forward(weights, images).argmax(1) == labels).mean() > 0.9


def test_conversion_is_deterministic(lenet: Path, converted: bytes) -> None:
    """The same Caffe files give the same ONNX bytes: job identity and plan fingerprint hold."""
    from jobs.caffe import convert_caffe

    again = convert_caffe((lenet / "deploy.prototxt").read_bytes(),
                          (lenet / "net.caffemodel").read_bytes())
    assert again == converted


def test_an_unsupported_layer_is_named_with_its_type(lenet: Path) -> None:
    from jobs.caffe import convert_caffe

    deploy = (lenet / "deploy.prototxt").read_text()
    odd = deploy + 'layer {\n  name: "odd"\n  type: "Mystery"\n  bottom: "prob"\n  top: "odd"\n}\n'
    with pytest.raises(SpecError, match=re.escape(
            "caffe2onnx 2.0.1 cannot convert the Caffe model at layer 'odd' (type Mystery): it "
            "has no conversion for layer type Mystery; replace the layer with ones it supports, "
            "or convert the model to ONNX another way and pass it with --model")):
        convert_caffe(odd.encode(), (lenet / "net.caffemodel").read_bytes())


def test_files_that_are_not_caffe_are_refused(lenet: Path) -> None:
    from jobs.caffe import convert_caffe

    with pytest.raises(SpecError, match=r"cannot convert the Caffe model: the prototxt does not "
                                        r"parse as a Caffe NetParameter"):
        convert_caffe(b"layer { this is not caffe", (lenet / "net.caffemodel").read_bytes())
    with pytest.raises(SpecError, match="the caffemodel does not parse as a Caffe NetParameter"):
        convert_caffe((lenet / "deploy.prototxt").read_bytes(), b"\xff\xfe not protobuf")


@pytest.mark.ray
def test_lenet_job_relabels_the_digits(ray_cluster: None, lenet: Path, tmp_path: Path) -> None:
    """The worked example of the README: a Caffe model relabels MNIST-like digits."""
    from jobs.driver import run_job

    out = tmp_path / "out"
    spec = spec_from_args([
        "--model", str(lenet / "deploy.prototxt"), "--weights", str(lenet / "net.caffemodel"),
        "--input", str(lenet / "digits"), "--output", str(out), "--column", "data=pixels",
        "--keep", "uid", "--keep", "digit", "--postprocess", "argmax", "--no-softmax",
        "--labels", str(lenet / "labels.txt"), "--backend", "onnxruntime", "--workers", "2",
        "--rows-per-shard", "512", "--no-progress"])
    report = run_job(spec)
    assert report.exit_code == 0 and report.committed >= 2
    assert report.manifest["job"]["converted_by"] == "caffe2onnx 2.0.1"
    table = pq.read_table(out).sort_by("uid")
    images, labels = digits_28()
    want = forward(dict(np.load(lenet / "weights.npz")), images)
    assert table.column("uid").to_pylist() == list(range(len(images)))
    np.testing.assert_array_equal(table.column("label_name").to_pylist(),
                                  [LABELS[i] for i in want.argmax(1)])
    np.testing.assert_allclose(table.column("score").to_numpy(), want.max(1), atol=1e-5)
    assert (np.asarray(table.column("label").to_pylist()) == labels).mean() > 0.9
    assert table.column("digit").to_pylist() == labels.tolist()


def test_a_prototxt_needs_its_weights_and_onnx_needs_none() -> None:
    with pytest.raises(SpecError, match=re.escape(
            "model 'deploy.prototxt' is a Caffe deploy.prototxt, which holds no weights; pass "
            "its trained net.caffemodel with --weights URI (weights: in the config)")):
        JobSpec(model="deploy.prototxt", input="in", output="out")
    with pytest.raises(SpecError, match=re.escape(
            "weights 'net.caffemodel' are for a Caffe model, and model 'm.onnx' is an ONNX "
            "model, which holds its own; drop --weights")):
        JobSpec(model="m.onnx", weights="net.caffemodel", input="in", output="out")
