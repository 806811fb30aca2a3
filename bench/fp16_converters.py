"""FP16/BF16 converters side by side on the models naive conversion gets wrong.

    python -m bench.fp16_converters [--precision fp16|bf16]

For each model of `tests.precision_models` and each converter that imports here, the converted
model is computed in its own types by ONNX's reference evaluator (numpy float16, ml_dtypes
bfloat16) and compared with the FP32 model on ONNX Runtime: the largest error relative to the
output's largest magnitude, or what went wrong. Converters: this runner's
(`workers.onnx_precision.convert_float`), onnxconverter-common's `float16` converter alone
(keep_io_types, its default block list), and NVIDIA ModelOpt's AutoCast when `modelopt` imports
(it needs torch): `convert_to_mixed_precision`, which classifies nodes from reference runs on
random inputs. This is how the converter was chosen (docs/tensorrt.md); it is not a timing.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import warnings
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx.reference import ReferenceEvaluator

from tests.precision_models import MODELS
from workers.onnx_precision import convert_float

Converter = Callable[[bytes, str], bytes]


def ours(model: bytes, precision: str) -> bytes:
    return convert_float(model, precision)


def converter_common(model: bytes, precision: str) -> bytes:
    if precision != "fp16":
        raise ValueError("onnxconverter-common converts to float16 only")
    from onnxconverter_common import float16

    proto = float16.convert_float_to_float16(onnx.load_model_from_string(model),
                                             keep_io_types=True)
    onnx.checker.check_model(proto, full_check=True)
    return bytes(proto.SerializeToString())


def autocast(model: bytes, precision: str) -> bytes:
    from modelopt.onnx.autocast import convert_to_mixed_precision

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        with open(path, "wb") as f:
            f.write(model)
        proto = convert_to_mixed_precision(path, precision, keep_io_types=True)
    onnx.checker.check_model(proto, full_check=True)
    return bytes(proto.SerializeToString())


def converters() -> dict[str, Converter]:
    found: dict[str, Converter] = {"this runner": ours, "onnxconverter-common": converter_common}
    try:
        import modelopt.onnx.autocast  # noqa: F401
    except ImportError as exc:
        print(f"(ModelOpt AutoCast not compared: {exc.__class__.__name__}: {exc})")
    else:
        found["ModelOpt AutoCast"] = autocast
    return found


def evaluate(convert: Converter, name: str, precision: str) -> str:
    make_model, make_inputs = MODELS[name]
    model = make_model()
    feed = make_inputs(8, 5)
    want = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, feed)
    try:
        converted = convert(model, precision)
    except Exception as exc:  # any converter failure is a result here
        return f"fails: {exc.__class__.__name__}: {str(exc).splitlines()[0][:70]}"
    with np.errstate(all="ignore"):
        got = ReferenceEvaluator(converted).run(None, feed)
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        g = np.asarray(g)
        if g.shape != w.shape:
            return f"wrong shape {list(g.shape)} (want {list(w.shape)})"
        if not np.isfinite(g.astype(np.float32)).all():
            return "NaN/inf in the output"
        if g.dtype != w.dtype:
            return f"output is {g.dtype} (want {w.dtype})"
        worst = max(worst, float(np.abs(g - w).max() / max(float(np.abs(w).max()), 1e-6)))
    return f"{worst:.1e}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=["fp16", "bf16"], default="fp16")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    found = converters()
    print(f"| model ({args.precision}) | " + " | ".join(found) + " |")
    print("|---|" + "---|" * len(found))
    for name in MODELS:
        cells = [evaluate(convert, name, args.precision) for convert in found.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
