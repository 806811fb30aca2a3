"""Table example, made here, nothing downloaded: scikit-learn's bundled breast-cancer table as
Parquet feature columns, and a logistic regression trained on it, exported to ONNX by hand.

    python -m examples.patients demo-data/tabular

writes `patients/` (Parquet: patient_id, diagnosis and 30 feature columns named mean_radius,
radius_error, worst_radius, ...; some float32, some float64, two integer), `labels.txt`
(malignant, benign) and `classifier.onnx` (input features [N, 30] float32, standardization
folded in; output logits [N, 2]).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
from onnx import TensorProto, helper, numpy_helper

#: Stored as integers in the Parquet (rounded), as a warehouse might: features need not be float.
INTEGER_COLUMNS = ("mean_area", "worst_area")


def column_names() -> list[str]:
    """The dataset's feature names as column names: `mean radius` -> `mean_radius`."""
    from sklearn.datasets import load_breast_cancer

    return [n.replace(" ", "_") for n in load_breast_cancer().feature_names]


def load_table() -> tuple[pa.Table, np.ndarray]:
    """The Parquet table and the float32 feature matrix the model sees (in column order)."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    names = column_names()
    columns: dict[str, pa.Array] = {
        "patient_id": pa.array(np.arange(100_000, 100_000 + len(data.target), dtype=np.int64)),
        "diagnosis": pa.array([str(data.target_names[t]) for t in data.target]),
    }
    x = np.empty(data.data.shape, np.float32)
    for j, name in enumerate(names):
        values = data.data[:, j]
        if name in INTEGER_COLUMNS:
            stored = np.round(values).astype(np.int32)
            columns[name] = pa.array(stored)
            x[:, j] = stored
        elif j % 2:
            columns[name] = pa.array(values.astype(np.float32))
            x[:, j] = values.astype(np.float32)
        else:
            columns[name] = pa.array(values)
            x[:, j] = values
    return pa.table(columns), x


def train(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Standardize, then logistic regression; returns mean, scale, coefficients and intercept."""
    from sklearn.linear_model import LogisticRegression

    mean, scale = x.mean(axis=0), x.std(axis=0)
    clf = LogisticRegression(max_iter=2000).fit((x - mean) / scale, y)
    return {"mean": mean, "scale": scale, "coef": clf.coef_[0], "intercept": clf.intercept_}


def classifier_model(params: dict[str, np.ndarray]) -> onnx.ModelProto:
    """`logits = [0, z]` with `z = ((x - mean) / scale) . coef + intercept`: softmax of it is the
    classifier's (malignant, benign) probabilities."""
    features = len(params["coef"])
    weights = np.zeros((features, 2), np.float32)
    weights[:, 1] = params["coef"]
    bias = np.array([0.0, params["intercept"][0]], np.float32)
    nodes = [
        helper.make_node("Sub", ["features", "mean"], ["centered"]),
        helper.make_node("Div", ["centered", "scale"], ["standard"]),
        helper.make_node("Gemm", ["standard", "weights", "bias"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "breast_cancer_logreg",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(params["mean"].astype(np.float32), "mean"),
         numpy_helper.from_array(params["scale"].astype(np.float32), "scale"),
         numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="examples.patients")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def make(out: str, files: int = 2) -> dict[str, Any]:
    """Write the whole example under `out`; returns the paths and the training accuracy."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    table, x = load_table()
    params = train(x, data.target)
    model_path = os.path.join(out, "classifier.onnx")
    os.makedirs(os.path.join(out, "patients"), exist_ok=True)
    onnx.save(classifier_model(params), model_path)
    per_file = -(-table.num_rows // files)
    for i in range(files):
        pq.write_table(table.slice(i * per_file, per_file),
                       os.path.join(out, "patients", f"patients-{i:03d}.parquet"),
                       row_group_size=100)
    labels_path = os.path.join(out, "labels.txt")
    with open(labels_path, "w") as f:
        f.write("\n".join(str(n) for n in data.target_names) + "\n")
    z = ((x - params["mean"]) / params["scale"]) @ params["coef"] + params["intercept"][0]
    accuracy = float(((z > 0).astype(int) == data.target).mean())
    return {"model": model_path, "input": os.path.join(out, "patients"), "labels": labels_path,
            "train_accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.patients", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="directory to write into")
    args = parser.parse_args()
    for name, value in make(args.out).items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
