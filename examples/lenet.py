"""Caffe example, made here, nothing downloaded: the MNIST LeNet as a Caffe deploy.prototxt and a
net.caffemodel, and scikit-learn's bundled digits as MNIST-like 28x28 images in Parquet.

    python -m examples.lenet demo-data/lenet

writes `deploy.prototxt` and `net.caffemodel` (Caffe's LeNet: conv 20 5x5, max pool, conv 50
5x5, max pool, inner product 500, ReLU, inner product 10, softmax; input `data` [1, 1, 28, 28]),
both built with the converter's own Caffe protobuf classes (caffe2onnx), `labels.txt` (one name
per line, as Caffe's labels files), `digits/part-0.parquet` (uid, digit: the true label, pixels: fixed-shape
tensor [1, 28, 28] float32 in [0, 1]) and `weights.npz` (the same weights, for `forward`, a
numpy reference of the network). The convolution and first inner-product weights are seeded
(random features); the last inner product is trained here on those features (softmax
regression), so the labels mean something. Needs caffe2onnx:
`pip install --no-deps caffe2onnx==2.0.1`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import numpy as np

LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
#: Caffe's LeNet, layer by layer: (name, blob shapes)
SHAPES = {"conv1": [(20, 1, 5, 5), (20,)], "conv2": [(50, 20, 5, 5), (50,)],
          "ip1": [(500, 800), (500,)], "ip2": [(10, 500), (10,)]}


def digits_28() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as MNIST-sized [N, 1, 28, 28] float32 in [0, 1], and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = digits.images.astype(np.float32) / 16.0
    big = np.kron(small, np.ones((3, 3), np.float32))  # 24x24
    images = np.pad(big, ((0, 0), (2, 2), (2, 2)))[:, None]  # 28x28, centred as MNIST's are
    return images, digits.target.astype(np.int64)


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    windows = np.lib.stride_tricks.sliding_window_view(x, w.shape[2:], axis=(2, 3))
    return np.einsum("nchwij,ocij->nohw", windows, w, optimize=True) + b[None, :, None, None]


def _max_pool(x: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def features(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """LeNet up to ip1 + ReLU, in float64 numpy: [N, 500]."""
    h = _max_pool(_conv(x.astype(np.float64), weights["conv1_w"], weights["conv1_b"]))
    h = _max_pool(_conv(h, weights["conv2_w"], weights["conv2_b"]))
    h = h.reshape(len(h), -1) @ weights["ip1_w"].T + weights["ip1_b"]
    return np.maximum(h, 0.0)


def forward(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The whole network in numpy (the reference a converted model is compared with): [N, 10]."""
    logits = features(weights, x) @ weights["ip2_w"].T + weights["ip2_b"]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def make_weights(images: np.ndarray, labels: np.ndarray, seed: int = 0,
                 steps: int = 300) -> dict[str, np.ndarray]:
    """Seeded conv/ip1 weights (He initialization) and an ip2 trained on their features."""
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    for name in ("conv1", "conv2", "ip1"):
        shape = SHAPES[name][0]
        fan_in = int(np.prod(shape[1:]))
        weights[f"{name}_w"] = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        weights[f"{name}_b"] = np.zeros(shape[0])
    raw = features(weights, images)
    scale = float(raw.std()) or 1.0
    feats = raw / scale  # trained on unit-scale features, folded back into ip2 below
    w, b = np.zeros((10, 500)), np.zeros(10)
    onehot = np.eye(10)[labels]
    for _ in range(steps):  # softmax regression, full-batch gradient descent
        logits = feats @ w.T + b
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        grad = (p - onehot) / len(feats)
        w -= 0.5 * (grad.T @ feats + 1e-4 * w)
        b -= 0.5 * grad.sum(axis=0)
    weights["ip2_w"], weights["ip2_b"] = w / scale, b
    return {k: v.astype(np.float32) for k, v in weights.items()}


def caffe_files(weights: dict[str, np.ndarray]) -> tuple[str, bytes]:
    """(deploy.prototxt text, net.caffemodel bytes), written with caffe2onnx's Caffe classes.

    Those classes load only with protobuf's pure-Python implementation (see jobs/caffe.py), so
    this runs where PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python was set before protobuf was
    first imported (`main` sets it).
    """
    from caffe2onnx.proto import caffe_upsample_pb2 as caffe_pb2
    from google.protobuf import text_format

    net = caffe_pb2.NetParameter()
    net.name = "LeNet"

    def layer(name: str, kind: str, bottom: str | None, top: str) -> caffe_pb2.LayerParameter:
        new = net.layer.add()
        new.name, new.type = name, kind
        if bottom:
            new.bottom.append(bottom)
        new.top.append(top)
        return new

    layer("data", "Input", None, "data").input_param.shape.add().dim.extend([1, 1, 28, 28])
    for name, bottom, outputs in (("conv1", "data", 20), ("conv2", "pool1", 50)):
        conv = layer(name, "Convolution", bottom, name).convolution_param
        conv.num_output = outputs
        conv.kernel_size.append(5)
        conv.stride.append(1)
        pool = layer(f"pool{name[-1]}", "Pooling", name, f"pool{name[-1]}").pooling_param
        pool.pool = caffe_pb2.PoolingParameter.MAX
        pool.kernel_size, pool.stride = 2, 2
    layer("ip1", "InnerProduct", "pool2", "ip1").inner_product_param.num_output = 500
    layer("relu1", "ReLU", "ip1", "ip1")
    layer("ip2", "InnerProduct", "ip1", "ip2").inner_product_param.num_output = 10
    layer("prob", "Softmax", "ip2", "prob")
    deploy = text_format.MessageToString(net)
    trained = caffe_pb2.NetParameter()
    trained.CopyFrom(net)
    for entry in trained.layer:
        if entry.name in SHAPES:
            for suffix in ("w", "b"):
                array = weights[f"{entry.name}_{suffix}"]
                blob = entry.blobs.add()
                blob.shape.dim.extend(array.shape)
                blob.data.extend(array.ravel().tolist())
    return deploy, trained.SerializeToString()


def write_table(directory: str, images: np.ndarray, labels: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(directory, exist_ok=True)
    tensor_type = pa.fixed_shape_tensor(pa.float32(), [1, 28, 28])
    flat = pa.array(images.reshape(len(images), -1).ravel(), pa.float32())
    pixels = pa.ExtensionArray.from_storage(
        tensor_type, pa.FixedSizeListArray.from_arrays(flat, 28 * 28))
    table = pa.table({"uid": pa.array(np.arange(len(images)), pa.int64()),
                      "digit": pa.array(labels, pa.int64()), "pixels": pixels})
    pq.write_table(table, os.path.join(directory, "part-0.parquet"), row_group_size=256)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="directory to write into")
    args = parser.parse_args(argv)
    images, labels = digits_28()
    weights = make_weights(images, labels)
    deploy, caffemodel = caffe_files(weights)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "deploy.prototxt"), "w") as f:
        f.write(deploy)
    with open(os.path.join(args.out, "net.caffemodel"), "wb") as f:
        f.write(caffemodel)
    with open(os.path.join(args.out, "labels.txt"), "w") as f:
        f.write("\n".join(LABELS) + "\n")
    np.savez(os.path.join(args.out, "weights.npz"), **weights)
    write_table(os.path.join(args.out, "digits"), images, labels)
    accuracy = float((forward(weights, images).argmax(1) == labels).mean())
    print(f"wrote {args.out}: deploy.prototxt, net.caffemodel, labels.txt, weights.npz, "
          f"digits/ ({len(images)} rows); numpy reference accuracy {accuracy:.2%}")
    return 0


if __name__ == "__main__":
    # Before anything imports protobuf: caffe2onnx's generated classes need the pure-Python
    # implementation (jobs/caffe.py explains).
    os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
    raise SystemExit(main())
