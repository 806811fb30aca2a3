"""The three entrypoints end to end on the local Ray, on the examples' models and data (made in
the repo), each output checked against the model run directly on the same rows."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from onnx import TensorProto, helper, numpy_helper

from jobs.presets import ENRICH, RELABEL, SCORE

pytestmark = pytest.mark.ray


def session(path: str) -> ort.InferenceSession:
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def manifest(output: Path) -> dict[str, Any]:
    return dict(json.loads((output / "_manifest.json").read_text()))


@pytest.fixture(scope="module")
def patients(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from examples.patients import make

    return make(str(tmp_path_factory.mktemp("tabular")))


@pytest.fixture(scope="module")
def reviews(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from examples.reviews import make

    return make(str(tmp_path_factory.mktemp("text")), rows=600)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from examples.digits import make

    return make(str(tmp_path_factory.mktemp("digits")))


def test_score_features_to_labels(ray_cluster: None, patients: dict[str, Any],
                                  tmp_path: Path) -> None:
    from examples.patients import column_names

    out = tmp_path / "scores"
    code = SCORE.main(["--model", patients["model"], "--input", patients["input"],
                       "--output", str(out), "--features", "mean_*,*_error,worst_*",
                       "--keep", "patient_id", "--keep", "diagnosis",
                       "--postprocess", "raw", "--postprocess", "argmax",
                       "--labels", patients["labels"], "--batch-size", "64"])
    assert code == 0
    got = pq.read_table(out).sort_by("patient_id")
    assert got.column_names == ["patient_id", "diagnosis", "logits", "label", "label_name",
                                "score"]
    assert got.schema.field("label").type == pa.int32()
    table = pq.read_table(patients["input"]).sort_by("patient_id")
    features = np.column_stack([table.column(c).to_numpy().astype(np.float64)
                                for c in column_names()]).astype(np.float32)
    logits = session(patients["model"]).run(None, {"features": features})[0]
    np.testing.assert_allclose(np.stack(got.column("logits").to_numpy(zero_copy_only=False)),
                               logits, rtol=1e-6)
    np.testing.assert_array_equal(got.column("label").to_numpy(), logits.argmax(axis=1))
    np.testing.assert_allclose(got.column("score").to_numpy(), softmax(logits).max(axis=1),
                               rtol=1e-5)
    agree = np.mean(np.array(got.column("label_name").to_pylist())
                    == np.array(got.column("diagnosis").to_pylist()))
    assert agree == pytest.approx(patients["train_accuracy"])


def enrich_args(model: str, reviews: dict[str, Any], out: Path) -> list[str]:
    return ["--model", model, "--input", reviews["input"], "--output", str(out),
            "--text-column", "review", "--tokenizer", reviews["tokenizer"], "--max-length", "64",
            "--keep", "review_id", "--batch-size", "50", "--preprocess-threads", "2"]


def enrich(model: str, reviews: dict[str, Any], out: Path) -> int:
    return ENRICH.main(enrich_args(model, reviews, out))


def sha256_of(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def embeddings_of(out: Path) -> np.ndarray:
    got = pq.read_table(out).sort_by("review_id")
    return np.stack(got.column("embedding").to_numpy(zero_copy_only=False))


def test_enrich_text_to_embeddings(ray_cluster: None, reviews: dict[str, Any],
                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tokenizers import Tokenizer

    out = tmp_path / "embeddings"
    assert enrich(reviews["model"], reviews, out) == 0
    # The mean pooling ran in the model's graph: the engine returned [N, D] only.
    assert "mean pooling of output 'last_hidden_state' over mask 'attention_mask' runs in the " \
        "model's graph" in capsys.readouterr().err
    model_record = manifest(out)["model"]
    assert [o["name"] for o in model_record["outputs"]] == ["last_hidden_state_pooled"]
    assert model_record["sha256"] == sha256_of(reviews["model"])  # the file, as the user has it
    assert model_record["graph_pooling"]["output"] == "last_hidden_state_pooled"
    assert model_record["graph_pooling"]["model_sha256"] != model_record["sha256"]
    got = pq.read_table(out).sort_by("review_id")
    assert got.num_rows == 600
    assert got.schema.field("embedding").type == pa.list_(pa.float32(), 64)
    embeddings = np.stack(got.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    # Reference: each review alone (no padding at all), mean over its tokens, L2-normalized.
    texts = pq.read_table(reviews["input"]).sort_by("review_id").column("review").to_pylist()
    tokenizer = Tokenizer.from_file(reviews["tokenizer"])
    tokenizer.enable_truncation(64)
    model = session(reviews["model"])
    for i in range(0, 600, 37):
        ids = np.array([tokenizer.encode(texts[i]).ids], np.int64)
        hidden = model.run(["last_hidden_state"], {"input_ids": ids,
                                                   "attention_mask": np.ones_like(ids),
                                                   "token_type_ids": np.zeros_like(ids)})[0][0]
        want = hidden.mean(axis=0)
        np.testing.assert_allclose(embeddings[i], want / np.linalg.norm(want), atol=2e-5)


def test_enrich_pools_on_the_host_where_the_graph_cannot_and_agrees(
        ray_cluster: None, reviews: dict[str, Any], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A model with external data is not rewritten: the host pools, to the same embeddings."""
    external = tmp_path / "model" / "encoder.onnx"
    external.parent.mkdir()
    onnx.save(onnx.load(reviews["model"]), str(external), save_as_external_data=True,
              all_tensors_to_one_file=True, location="weights.bin")
    host, graph = tmp_path / "host", tmp_path / "graph"
    assert enrich(str(external), reviews, host) == 0
    err = capsys.readouterr().err
    assert "mean pooling of output 'last_hidden_state' runs on the host: the model keeps " \
        "tensors in external data files" in err
    assert "graph_pooling" not in manifest(host)["model"]
    assert enrich(reviews["model"], reviews, graph) == 0
    assert "graph_pooling" in manifest(graph)["model"]
    np.testing.assert_allclose(embeddings_of(graph), embeddings_of(host), atol=1e-6)


def test_an_output_that_pooled_on_the_host_resumes_pooling_there(
        ray_cluster: None, reviews: dict[str, Any], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A run that pooled on the host (every run did, before pooling moved into the graph) is
    resumed, not refused as another job's, and its missing parts pool on the host as well."""
    from jobs.driver import prepare, run_job
    from jobs.spec import spec_from_args

    out = tmp_path / "embeddings"
    spec = spec_from_args(enrich_args(reviews["model"], reviews, out), ENRICH.parser())
    job = prepare(spec)
    assert job.graph_pooling is not None
    earlier = job.pooled_on_host("as before pooling moved into the graph")
    # The identity runs before pooling in the graph had: the file's hash, host processing.
    assert earlier.identity["model_sha256"] == sha256_of(reviews["model"])
    assert "graph_pooling" not in earlier.identity
    assert earlier.identity["fingerprint"] != job.identity["fingerprint"]
    assert run_job(spec, prepared=earlier).exit_code == 0
    whole = embeddings_of(out)
    parts = sorted(out.glob("part-*.parquet"))
    for part in parts[:2]:
        part.unlink()
    capsys.readouterr()
    report = run_job(spec)
    assert (report.exit_code, report.committed, report.skipped) == (0, 2, len(parts) - 2)
    assert "mean pooling of output 'last_hidden_state' runs on the host: the output holds an " \
        "earlier run of this job that pooled there" in capsys.readouterr().err
    assert "graph_pooling" not in manifest(out)["model"]
    np.testing.assert_array_equal(embeddings_of(out), whole)  # every part pooled alike
    # A new output pools in the graph.
    fresh = tmp_path / "fresh"
    assert run_job(replace(spec, output=str(fresh))).exit_code == 0
    assert manifest(fresh)["model"]["graph_pooling"]["pooling"] == "mean"


def test_a_host_pooled_record_written_by_an_earlier_version_is_recognized(
        reviews: dict[str, Any], tmp_path: Path) -> None:
    """Runs from before pooling moved into the graph wrote `_job.json` the old way too (the
    input as typed): such a record still resumes pooling on the host, as `OutputDir.check`
    accepts it, instead of being refused as another job's."""
    from jobs.driver import as_earlier_run, prepare
    from jobs.output import canonical_identity
    from jobs.spec import spec_from_args

    spec = spec_from_args(enrich_args(reviews["model"], reviews, tmp_path / "out"),
                          ENRICH.parser())
    job = prepare(spec)
    host = job.pooled_on_host("as before").identity
    old = {**host, "input": host["input"] + "/"}  # as typed, with a trailing separator
    old["fingerprint"] = "written-by-an-earlier-version"
    assert canonical_identity(old)["fingerprint"] == host["fingerprint"]
    resumed = as_earlier_run(job, old)
    assert resumed.graph_pooling is None and resumed.identity["fingerprint"] == host["fingerprint"]
    other = {**old, "model_sha256": "0" * 64}  # another model: left to OutputDir.check
    assert as_earlier_run(job, other).graph_pooling is not None


def test_relabel_an_image_directory_skipping_a_corrupt_file(ray_cluster: None,
                                                            digits: dict[str, Any],
                                                            tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    from examples.digits import preprocess

    out = tmp_path / "relabel"
    argv = ["--model", digits["model"], "--input", digits["images"], "--output", str(out),
            "--labels", digits["labels"], "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5",
            "--top-k", "3", "--on-bad-image", "skip", "--rows-per-shard", "700",
            "--preprocess-threads", "2"]
    assert RELABEL.main(argv) == 0
    got = pq.read_table(out).sort_by("path")
    assert got.column_names == ["path", "label", "label_name", "score", "topk_labels",
                                "topk_names", "topk_scores"]
    truth = pq.read_table(digits["truth"]).sort_by("path")
    assert got.num_rows == truth.num_rows == 1797
    assert [p.removeprefix("file://") for p in got.column("path").to_pylist()] == \
        truth.column("path").to_pylist()
    # Against the model run directly on the same pixels.
    data = [Path(p).read_bytes() for p in truth.column("path").to_pylist()]
    logits = session(digits["model"]).run(None, {"pixels": preprocess(data)})[0]
    np.testing.assert_array_equal(got.column("label").to_numpy(), logits.argmax(axis=1))
    np.testing.assert_allclose(got.column("score").to_numpy(), softmax(logits).max(axis=1),
                               rtol=1e-5)
    assert got.column("topk_labels").to_pylist() == \
        np.argsort(-logits, axis=1)[:, :3].tolist()
    labels = truth.column("label").to_numpy()
    test = np.array(truth.column("split").to_pylist()) == "test"
    assert np.mean(got.column("label").to_numpy()[test] == labels[test]) > 0.9
    # The corrupt file failed its row, recorded with its path; the shard committed.
    record = manifest(out)
    assert record["rows_failed"] == 1 and record["shards_failed"] == 0
    # The summary counts the rows written, not the corrupt file's row too.
    assert record["rows"] == 1797
    assert "done: 1,797 rows in " in capsys.readouterr().err
    failures = [f for s in record["shards"] for f in s.get("row_failures", [])]
    assert len(failures) == 1 and failures[0]["key"]["path"].endswith("/broken.jpg")
    assert failures[0]["column"] == "image" and "cannot decode" in failures[0]["reason"]
    # Rerun: every shard is skipped, and the manifest still lists the failed row.
    assert RELABEL.main(argv) == 0
    again = manifest(out)
    assert again["shards_skipped"] == len(again["shards"]) == 3
    assert again["rows_failed"] == 1


def test_relabel_a_parquet_image_column(ray_cluster: None, digits: dict[str, Any],
                                        tmp_path: Path) -> None:
    out = tmp_path / "relabel-parquet"
    argv = ["--model", digits["model"], "--input", digits["parquet"], "--output", str(out),
            "--image-column", "image", "--labels", digits["labels"], "--mean", "0.5,0.5,0.5",
            "--std", "0.5,0.5,0.5", "--postprocess", "argmax", "--rows-per-shard", "512"]
    assert RELABEL.main([*argv, "--keep", "uid"]) == 0
    got = pq.read_table(out).sort_by("uid")
    assert got.column_names == ["uid", "label", "label_name", "score"]
    source = pq.read_table(digits["parquet"]).sort_by("uid")
    directory = pq.read_table(digits["truth"])
    assert got.num_rows == source.num_rows == directory.num_rows
    assert np.mean(got.column("label").to_numpy() == source.column("label").to_numpy()) > 0.9
    # Keeping the input's own `label` column would collide with argmax's.
    assert RELABEL.main([*argv, "--keep", "label", "--output", str(tmp_path / "o2")]) == 2


def tiny_model(path: Path) -> None:
    """x [N, 2] float32 -> y = x @ W [N, 3]."""
    w = np.array([[1.0, 0.5, -1.0], [2.0, 0.0, 1.0]], np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_user_functions_run_in_the_actors(ray_cluster: None, tmp_path: Path) -> None:
    tiny_model(tmp_path / "tiny.onnx")
    (tmp_path / "data").mkdir()
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(50), rng.integers(-5, 5, 50)
    pq.write_table(pa.table({"id": np.arange(50), "a": a, "b": b}), tmp_path / "data" / "t.parquet",
                   row_group_size=20)
    out = tmp_path / "out"
    code = SCORE.main(["--model", str(tmp_path / "tiny.onnx"), "--input", str(tmp_path / "data"),
                       "--output", str(out), "--preprocess", "tests.user_functions:scale_features",
                       "--preprocess-columns", "a,b", "--keep", "id",
                       "--postprocess", "tests.user_functions:total", "--postprocess", "raw"])
    assert code == 0
    got = pq.read_table(out).sort_by("id")
    x = np.stack([a, 2.0 * b], axis=1).astype(np.float32)
    y = x @ np.array([[1.0, 0.5, -1.0], [2.0, 0.0, 1.0]], np.float32)
    np.testing.assert_allclose(got.column("total").to_numpy(), y.sum(axis=1), rtol=1e-5)
    assert got.column("count").to_pylist() == [3] * 50
    assert got.column_names == ["id", "total", "count", "y"]


def test_a_bad_spec_exits_2_before_any_worker_starts(patients: dict[str, Any], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    labels = tmp_path / "three.txt"
    labels.write_text("a\nb\nc\n")
    code = SCORE.main(["--model", patients["model"], "--input", patients["input"],
                       "--output", str(tmp_path / "out"), "--features", "mean_*",
                       "--postprocess", "argmax", "--labels", str(labels)])
    assert code == 2
    err = capsys.readouterr().err
    assert "error: the features preprocessor stacks 10 column(s)" in err
    code = SCORE.main(["--model", patients["model"], "--input", patients["input"],
                       "--output", str(tmp_path / "out"), "--features", "mean_*,*_error,worst_*",
                       "--postprocess", "argmax", "--labels", str(labels)])
    assert code == 2
    assert "has 3 label(s), but output 'logits' of the model has 2 classes" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.subprocess
@pytest.mark.parametrize("name", ["score", "enrich", "relabel"])
def test_the_modules_run(name: str) -> None:
    done = subprocess.run([sys.executable, "-m", f"jobs.{name}", "--help"], capture_output=True,
                          text=True, check=False, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    assert f"python -m jobs.{name}" in done.stdout and "example:" in done.stdout
