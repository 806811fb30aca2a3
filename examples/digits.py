"""Image example, made here, nothing downloaded: scikit-learn's bundled 8x8 digits drawn as PNG
and JPEG files, and a small CNN trained on them with numpy, exported to ONNX with onnx.helper.

    python -m examples.digits demo-data/digits

writes `images/` (one file per digit: grayscale and RGB PNGs, RGB JPEGs, of a few sizes, plus
one corrupt JPEG), `images.parquet` (uid, label, image bytes), `truth.parquet` (path, label,
split), `labels.txt` and `cnn.onnx` (input [N, 3, 16, 16] float32, normalized with mean 0.5,
std 0.5; output logits [N, 10]). The CNN is trained on the images as the image preprocessor
decodes them, so what the job feeds it is what it learned from.
"""

from __future__ import annotations

import argparse
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
from onnx import TensorProto, helper, numpy_helper

LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SIZE = 16  # the model's input height and width
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
FILTERS = 16


def draw_digits(seed: int = 0) -> tuple[list[bytes], list[str], np.ndarray]:
    """Every bundled digit as an encoded image: (bytes, file name, labels).

    The 8x8 glyph is scaled up on a canvas of a random size around 40 px, at a random offset,
    and saved as a grayscale PNG, an RGB PNG or an RGB JPEG in turn.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    encoded, names = [], []
    for i, glyph in enumerate(digits.images):
        small = Image.fromarray((glyph * (255.0 / 16.0)).astype(np.uint8), mode="L")
        scale = int(rng.integers(28, 34))
        big = small.resize((scale, scale), Image.Resampling.BICUBIC)
        width, height = int(rng.integers(36, 44)), int(rng.integers(36, 44))
        canvas = Image.new("L", (width, height))
        canvas.paste(big, ((width - scale) // 2 + int(rng.integers(-1, 2)),
                           (height - scale) // 2 + int(rng.integers(-1, 2))))
        buffer = io.BytesIO()
        kind = i % 3
        if kind == 0:
            canvas.save(buffer, format="PNG")
            names.append(f"digit-{i:04d}.png")
        elif kind == 1:
            canvas.convert("RGB").save(buffer, format="PNG")
            names.append(f"digit-{i:04d}-rgb.png")
        else:
            canvas.convert("RGB").save(buffer, format="JPEG", quality=92)
            names.append(f"digit-{i:04d}.jpg")
        encoded.append(buffer.getvalue())
    return encoded, names, digits.target.astype(np.int64)


def preprocess(encoded: Sequence[bytes]) -> np.ndarray:
    """The pixels the job's image preprocessor makes for `cnn.onnx`: [N, 3, 16, 16] float32."""
    from workers.images import ImageDecoder

    # draft=True: JPEGs larger than the model's size decode at a reduced DCT scale, as the
    # job's image preprocessor does by default.
    decoder = ImageDecoder("RGB", (SIZE, SIZE), SIZE, True, mean=MEAN, std=STD, layout="NCHW",
                           dtype=np.dtype(np.float32))
    pixels, bad = decoder.decode(list(encoded))
    if bad:
        raise ValueError(f"undecodable training images: {bad}")
    return pixels


def _patches(x: np.ndarray) -> np.ndarray:
    """[N, H, W] -> [N, H*W, 9] 3x3 neighbourhoods (zero padding 1)."""
    n, h, w = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    cols = [padded[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)]
    return np.stack(cols, axis=-1).reshape(n, h * w, 9)


def train_cnn(x: np.ndarray, y: np.ndarray, epochs: int = 25, seed: int = 0,
              lr: float = 0.005) -> dict[str, np.ndarray]:
    """Conv 3x3 (16) -> ReLU -> max-pool 2 -> dense 10, trained with Adam on [N, 16, 16] inputs."""
    rng = np.random.default_rng(seed)
    n = len(x)
    half = SIZE // 2
    params = {
        "conv_w": rng.standard_normal((9, FILTERS)).astype(np.float32) * np.sqrt(2 / 9),
        "conv_b": np.zeros(FILTERS, np.float32),
        "fc_w": rng.standard_normal((half * half * FILTERS, 10)).astype(np.float32) * 0.01,
        "fc_b": np.zeros(10, np.float32),
    }
    moments = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in params.items()}
    patches = _patches(x.astype(np.float32))
    step = 0
    for _ in range(epochs):
        order = rng.permutation(n)
        for lo in range(0, n, 64):
            idx = order[lo:lo + 64]
            p, target = patches[idx], y[idx]
            b = len(idx)
            z = p @ params["conv_w"] + params["conv_b"]  # [b, 256, F]
            a = np.maximum(z, 0).reshape(b, half, 2, half, 2, FILTERS)
            pooled = a.max(axis=(2, 4))  # [b, 8, 8, F]
            flat = pooled.reshape(b, -1)
            logits = flat @ params["fc_w"] + params["fc_b"]
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            probs[np.arange(b), target] -= 1.0
            d_logits = probs / b
            grads = {"fc_w": flat.T @ d_logits, "fc_b": d_logits.sum(axis=0)}
            d_pooled = (d_logits @ params["fc_w"].T).reshape(b, half, 1, half, 1, FILTERS)
            winner = a == pooled[:, :, None, :, None, :]
            d_a = (winner * d_pooled).reshape(b, SIZE * SIZE, FILTERS)
            d_z = d_a * (z > 0)
            grads["conv_w"] = np.einsum("bpk,bpf->kf", p, d_z)
            grads["conv_b"] = d_z.sum(axis=(0, 1))
            step += 1
            for k, g in grads.items():
                m, v = moments[k]
                m *= 0.9
                m += 0.1 * g
                v *= 0.999
                v += 0.001 * g * g
                m_hat, v_hat = m / (1 - 0.9 ** step), v / (1 - 0.999 ** step)
                params[k] -= (lr * m_hat / (np.sqrt(v_hat) + 1e-8)).astype(np.float32)
    return params


def cnn_model(params: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The trained CNN as ONNX: Conv -> Relu -> MaxPool -> Flatten -> Gemm, RGB input.

    Trained on one gray channel; the RGB conv splits each weight over three equal channels, so a
    gray image gives exactly the trained response.
    """
    half = SIZE // 2
    gray = params["conv_w"].T.reshape(FILTERS, 1, 3, 3)
    conv_w = np.repeat(gray / 3.0, 3, axis=1).astype(np.float32)
    # Trained on features in (h, w, channel) order; ONNX's Flatten of NCHW gives (channel, h, w).
    fc_w = params["fc_w"].reshape(half, half, FILTERS, 10).transpose(2, 0, 1, 3).reshape(-1, 10)
    nodes = [
        helper.make_node("Conv", ["pixels", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1],
                         kernel_shape=[3, 3]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("MaxPool", ["relu"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(conv_w, "conv_w"),
         numpy_helper.from_array(params["conv_b"].astype(np.float32), "conv_b"),
         numpy_helper.from_array(np.ascontiguousarray(fc_w, dtype=np.float32), "fc_w"),
         numpy_helper.from_array(params["fc_b"].astype(np.float32), "fc_b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="examples.digits")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def make(out: str, epochs: int = 25, seed: int = 0) -> dict[str, Any]:
    """Write the whole example under `out`; returns the paths and the held-out accuracy."""
    import onnxruntime as ort

    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    encoded, names, labels = draw_digits(seed)
    test = np.arange(len(labels)) % 5 == 0  # every fifth image is held out
    pixels = preprocess(encoded)
    params = train_cnn(pixels[~test, 0], labels[~test], epochs=epochs, seed=seed)
    model = cnn_model(params)
    model_path = os.path.join(out, "cnn.onnx")
    onnx.save(model, model_path)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    predicted = session.run(None, {"pixels": pixels})[0].argmax(axis=1)
    accuracy = float((predicted[test] == labels[test]).mean())

    paths = []
    for data, name in zip(encoded, names, strict=True):
        path = os.path.join(out, "images", name)
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    # A truncated JPEG: the job fails its row (with --on-bad-image skip), not its shard.
    with open(os.path.join(out, "images", "broken.jpg"), "wb") as f:
        f.write(encoded[2][: len(encoded[2]) // 3])
    pq.write_table(pa.table({
        "path": pa.array([os.path.abspath(p) for p in paths]),
        "label": pa.array(labels),
        "split": pa.array(np.where(test, "test", "train")),
    }), os.path.join(out, "truth.parquet"))
    pq.write_table(pa.table({
        "uid": pa.array(np.arange(len(labels), dtype=np.int64)),
        "label": pa.array(labels),
        "image": pa.array(encoded, pa.binary()),
    }), os.path.join(out, "images.parquet"), row_group_size=256)
    labels_path = os.path.join(out, "labels.txt")
    with open(labels_path, "w") as f:
        f.write("\n".join(LABELS) + "\n")
    return {"model": model_path, "images": os.path.join(out, "images"),
            "parquet": os.path.join(out, "images.parquet"), "labels": labels_path,
            "truth": os.path.join(out, "truth.parquet"), "test_accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.digits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="directory to write into")
    parser.add_argument("--epochs", type=int, default=25)
    args = parser.parse_args()
    for name, value in make(args.out, epochs=args.epochs).items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
