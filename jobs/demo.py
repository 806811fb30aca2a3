"""`python -m jobs.demo`: the embedded default, end to end on this machine.

Trains a small classifier on scikit-learn's bundled digits (no download), exports it to ONNX,
writes the digits as a Parquet table, relabels the table with the job runner on a local Ray
(whatever engine this machine has), and prints accuracy against the true labels.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.driver import run_job
from jobs.spec import JobSpec
from workers.errors import MissingDependencyError, RunnerError

SEED = 0
#: The demo's own folder: the examples (`python -m examples.NAME demo-data/NAME`) have theirs,
#: so none writes into another's input.
DEFAULT_WORKDIR = "demo-data/demo"


def train_digits_model(path: str) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Train an MLP on 60% of the digits; write it as ONNX; return (sklearn test accuracy, X, y, split)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.neural_network import MLPClassifier
    except ImportError as exc:
        raise MissingDependencyError("the demo needs scikit-learn; pip install -e '.[demo]'") from exc
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    digits = load_digits()
    images = digits.images.astype(np.float32)  # [N, 8, 8], values 0..16
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(labels))
    split = np.empty(len(labels), dtype=object)
    cut = int(0.6 * len(labels))
    split[order[:cut]], split[order[cut:]] = "train", "test"
    train, test = split == "train", split == "test"
    flat = images.reshape(len(images), 64) / 16.0
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=400, random_state=SEED)
    clf.fit(flat[train], labels[train])
    sk_accuracy = float((clf.predict(flat[test]) == labels[test]).mean())

    (w1, w2), (b1, b2) = clf.coefs_, clf.intercepts_
    inits = [numpy_helper.from_array(np.array([1 / 16.0], np.float32), "scale"),
             numpy_helper.from_array(w1.astype(np.float32), "w1"),
             numpy_helper.from_array(b1.astype(np.float32), "b1"),
             numpy_helper.from_array(w2.astype(np.float32), "w2"),
             numpy_helper.from_array(b2.astype(np.float32), "b2")]
    nodes = [helper.make_node("Flatten", ["image"], ["flat"], axis=1),
             helper.make_node("Mul", ["flat", "scale"], ["x"]),
             helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
             helper.make_node("Relu", ["h"], ["hr"]),
             helper.make_node("Gemm", ["hr", "w2", "b2"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
             helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=1)]
    graph = helper.make_graph(
        nodes, "digits_mlp",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 8, 8])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["N", 1]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="jobs.demo")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return sk_accuracy, images, labels, split


def write_digits(directory: str, images: np.ndarray, labels: np.ndarray, split: np.ndarray,
                 files: int = 3) -> None:
    """The digits as Parquet: id, true_label, split, pixels (fixed-shape tensor 8x8)."""
    os.makedirs(directory, exist_ok=True)
    for i, rows in enumerate(np.array_split(np.arange(len(labels)), files)):
        table = pa.table({
            "id": pa.array(rows.astype(np.int64)),
            "true_label": pa.array(labels[rows]),
            "split": pa.array(split[rows].tolist()),
            "pixels": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(images[rows])),
        })
        pq.write_table(table, os.path.join(directory, f"digits-{i}.parquet"), row_group_size=128)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR,
                        help=f"where the model, data and output go (default {DEFAULT_WORKDIR})")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)
    try:
        model = os.path.join(args.workdir, "digits.onnx")
        data = os.path.join(args.workdir, "digits")
        out = os.path.join(args.workdir, "relabeled")
        os.makedirs(args.workdir, exist_ok=True)
        sk_accuracy, images, labels, split = train_digits_model(model)
        write_digits(data, images, labels, split)
        print(f"demo: trained an MLP on {int((split == 'train').sum())} digits; wrote {model} and "
              f"{len(labels)} rows to {data}/", file=sys.stderr)
        spec = JobSpec(model=model, input=data, output=out, columns=(("image", "pixels"),),
                       keep=("id", "true_label", "split"), batch_size=128, rows_per_shard=256,
                       workers=args.workers, backend=args.backend, overwrite=True)
        report = run_job(spec)
        if report.exit_code:
            return report.exit_code
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = pq.read_table(out)
    test = np.array(table.column("split").to_pylist()) == "test"
    predicted = table.column("label").to_numpy()
    truth = table.column("true_label").to_numpy()
    accuracy = float((predicted[test] == truth[test]).mean())
    result = {"rows": table.num_rows, "test_rows": int(test.sum()),
              "accuracy_on_test_split": round(accuracy, 4),
              "sklearn_accuracy_on_test_split": round(sk_accuracy, 4),
              "output": out, "backend": report.backend}
    print(json.dumps(result))
    print(f"demo: relabeled {table.num_rows} digits; accuracy on the held-out split "
          f"{accuracy:.2%} (scikit-learn's own: {sk_accuracy:.2%})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
