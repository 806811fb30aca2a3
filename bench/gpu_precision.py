"""`--precision` on ONNX Runtime's CUDA provider: a ResNet-50 in TF32, FP16 and BF16, engine alone.

Run on a machine with a CUDA GPU, onnxruntime-gpu and onnxconverter-common:

    python -m bench.gpu_precision --out $OUT

The ResNet-50-style model of `bench.gpu_pipeline` (random weights, batch norm folded) runs
through `OnnxRuntimeBackend` exactly as an actor loads it: `precision` fp32 with ONNX Runtime's
default TF32 convolutions (the baseline, measured in the same run), fp32 with TF32 off, and fp16
/ bf16, for which the backend converts the model with `workers.onnx_precision.convert_float`
(I/O stay float32). Rows/s are `bench.gpu_pipeline.engine_only`'s: inputs already on the device,
batches back to back on two streams, warmed up, median of the repeats. Accuracy: each mode's
logits for the same images against strict FP32 on the same GPU (largest error relative to the
largest logit, and top-1 agreement). A table is printed last; a JSON and a log go to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.gpu_pipeline import IMAGE, MODELS, engine_only, resnet
from bench.runlog import RunLog
from workers import cuda
from workers.backends.base import BackendConfig
from workers.backends.onnxruntime import OnnxRuntimeBackend, import_onnxruntime

#: label -> (precision, CUDA provider options)
MODES: dict[str, tuple[str, dict[str, str]]] = {
    "tf32": ("fp32", {"use_tf32": "1"}),
    "fp32": ("fp32", {"use_tf32": "0"}),
    "fp16": ("fp16", {}),
    "bf16": ("bf16", {}),
}


def logits(backend: OnnxRuntimeBackend, images: np.ndarray) -> np.ndarray:
    return np.concatenate([backend.infer({"image": images[i:i + 64]})["logits"]
                           for i in range(0, len(images), 64)]).astype(np.float64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    parser.add_argument("--model", default="resnet50", choices=sorted(MODELS))
    parser.add_argument("--modes", default="tf32,fp16,bf16,fp32",
                        help=f"comma-separated, of {', '.join(MODES)}; the first is the baseline")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--iters", type=int, default=24, help="batches per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check-rows", type=int, default=128)
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        parser.error(f"--modes takes {', '.join(MODES)}, got {unknown}")
    log = RunLog(Path(args.out), "gpu_precision", args.tag)
    ort = import_onnxruntime()
    if hasattr(ort, "preload_dlls"):
        try:  # CUDA and cuDNN from the nvidia-* wheels, if that is where they are
            ort.preload_dlls()
        except Exception as exc:  # the libraries may be on the loader's path instead
            log(f"onnxruntime.preload_dlls(): {exc}")
    if cuda.device_count() == 0 or "CUDAExecutionProvider" not in ort.get_available_providers():
        log(f"needs a CUDA GPU and onnxruntime-gpu: {cuda.device_count()} device(s), "
            f"providers {ort.get_available_providers()}")
        return 2
    cuda.set_device(0)
    results: dict[str, Any] = {
        "command": " ".join([sys.executable, "-m", "bench.gpu_precision", *(argv or sys.argv[1:])]),
        "device": {"name": cuda.device_name(0),
                   "cc": ".".join(map(str, cuda.compute_capability(0)))},
        "onnxruntime": ort.__version__, "model": args.model, "batch": args.batch, "modes": {}}
    log(f"device {results['device']}, onnxruntime {ort.__version__}")
    model = resnet(MODELS[args.model])
    images = np.random.default_rng(3).random((args.check_rows, *IMAGE), dtype=np.float32)
    outputs: dict[str, np.ndarray] = {}
    for mode in modes:
        precision, options = MODES[mode]
        t0 = time.perf_counter()
        backend = OnnxRuntimeBackend(model, BackendConfig(device="cuda", precision=precision),
                                     cuda_options=options)
        try:
            backend.load()
            loaded = time.perf_counter() - t0
            outputs[mode] = logits(backend, images)
            engine = engine_only(backend, args.batch, args.iters, 2, args.repeats)
        except Exception as exc:  # a mode the provider cannot run is a result, not a crash
            log(f"[{mode}] failed: {exc.__class__.__name__}: {exc}")
            results["modes"][mode] = {"error": f"{exc.__class__.__name__}: {exc}"}
            continue
        finally:
            backend.close()
        results["modes"][mode] = {"precision": precision, "cuda_options": options,
                                  "load_seconds": round(loaded, 2), **engine}
        log(f"[{mode}] loaded (conversion included) in {loaded:.1f} s; engine only "
            f"{engine['rows_per_s']:.0f} rows/s (runs {[round(r) for r in engine['runs']]})")
    reference = outputs.get("fp32")
    for mode, out in outputs.items():
        if reference is not None:
            error = float(np.abs(out - reference).max() / np.abs(reference).max())
            agree = float((out.argmax(1) == reference.argmax(1)).mean())
            results["modes"][mode].update(rel_error_vs_fp32=error, top1_agreement=agree,
                                          finite=bool(np.isfinite(out).all()))
    log.path(".json").write_text(json.dumps(results, indent=1))
    base = results["modes"].get(modes[0], {}).get("rows_per_s")
    lines = [f"card: {results['device']['name']} (cc {results['device']['cc']}); onnxruntime "
             f"{results['onnxruntime']}; {args.model}, batch {args.batch}, engine only, 2 streams",
             "", f"| mode | rows/s | vs {modes[0]} | rel. error vs strict fp32 | top-1 agreement |",
             "|---|---:|---:|---:|---:|"]
    for mode in modes:
        r = results["modes"][mode]
        if "error" in r:
            lines.append(f"| {mode} | failed: {r['error'][:80]} | | | |")
            continue
        ratio = f"{r['rows_per_s'] / base:.2f}" if base else "-"
        lines.append(f"| {mode} | {r['rows_per_s']:.0f} | {ratio} | "
                     f"{r.get('rel_error_vs_fp32', float('nan')):.1e} | "
                     f"{r.get('top1_agreement', float('nan')):.3f} |")
    text = "\n".join(lines)
    log.path(".md").write_text(text + "\n")
    log("\n" + text)
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
