"""`python -m jobs.plan`: inspect an ONNX model or a TensorRT plan, or build a plan on this machine.

    python -m jobs.plan inspect MODEL.onnx            # IR, opsets, producer, I/O (no TensorRT)
    python -m jobs.plan inspect model.plan --layers   # a plan's I/O and layers (needs TensorRT)
    python -m jobs.plan build MODEL.onnx -o model.plan [--precision fp16] [--max-batch N]
        [--workspace BYTES] [--hardware-compatible] [--version-compatible] [--plugins LIB]
        [-v | -q]
    python -m jobs.plan inspect MODEL.onnx --layers   # nodes and their output shapes
    python -m jobs.plan inspect MODEL.onnx -t model.txt   # the model as text (-T: with weights)
    python -m jobs.plan -V                            # versions (ONNX IR and opset, TensorRT, ...)

MODEL may also be a Caffe deploy.prototxt with --weights net.caffemodel (converted to ONNX).

`build` writes the plan atomically with a JSON sidecar (`model.plan.json`) holding the same
fingerprint inputs and facts the job's plan cache records.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from jobs.plan_cache import PlanKey, digest, read_external_data, sidecar_for
from workers.errors import MissingDependencyError, RunnerError, SpecError, StorageError
from workers.onnx_precision import model_types
from workers.plan_build import (
    DEFAULT_OPTIMIZATION_LEVEL,
    MAX_OPTIMIZATION_LEVEL,
    PRECISIONS,
    BuildConfig,
    external_data_locations,
    parse_bytes,
    plan_nbytes_text,
    target_key,
)
from workers.storage import read_bytes, write_bytes_atomic
from workers.tensors import ModelInfo, TensorMeta, describe_onnx

if TYPE_CHECKING:
    import tensorrt as trt


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.plan",
                                description="Inspect ONNX models and TensorRT plans; build plans.")
    p.add_argument("-V", "--version", action="store_true",
                   help="versions of ONNX (IR and opset), TensorRT, ONNX Runtime and the "
                   "converters, then exit")
    sub = p.add_subparsers(dest="command")

    ins = sub.add_parser("inspect", help="describe an ONNX model (no TensorRT needed) or a plan")
    ins.add_argument("model", metavar="MODEL", help="an .onnx model, a Caffe deploy.prototxt "
                     "(with --weights) or a TensorRT plan (any fsspec URI)")
    ins.add_argument("--weights", metavar="NET.caffemodel",
                     help="Caffe: the weights of MODEL (a deploy.prototxt), converted to ONNX")
    ins.add_argument("--layers", action="store_true",
                     help="the layers and their output shapes: an ONNX model's nodes (shapes "
                     "inferred by onnx), or a plan's layers from TensorRT's engine inspector")
    ins.add_argument("-t", "--text", metavar="FILE",
                     help="write the ONNX model as text, without its weights ('-': stdout)")
    ins.add_argument("-T", "--text-with-weights", metavar="FILE",
                     help="write the ONNX model as text, with its weights ('-': stdout)")
    ins.add_argument("--json", action="store_true", help="print JSON instead of text")
    ins.add_argument("--trust-host-code", action="store_true",
                     help="let TensorRT load a version-compatible plan that carries the lean "
                     "runtime (host code); only for plans you trust")

    b = sub.add_parser("build", help="build a TensorRT plan on this machine's GPU")
    b.add_argument("model", metavar="MODEL.onnx", help="the ONNX model, or a Caffe "
                   "deploy.prototxt with --weights (any fsspec URI)")
    b.add_argument("--weights", metavar="NET.caffemodel",
                   help="Caffe: the weights of MODEL (a deploy.prototxt), converted to ONNX")
    b.add_argument("-o", "--output", required=True, metavar="PLAN",
                   help="where to write the plan (its sidecar goes to PLAN.json)")
    b.add_argument("--precision", choices=PRECISIONS, default="fp32")
    b.add_argument("-b", "--max-batch", type=int, default=256, metavar="N",
                   help="largest batch the plan runs (default 256)")
    b.add_argument("--opt-batch", type=int, metavar="N",
                   help="batch size the builder tunes for (default: --max-batch)")
    b.add_argument("--min-batch", type=int, default=1, metavar="N",
                   help="smallest batch the plan runs (default 1)")
    b.add_argument("-w", "--workspace", metavar="BYTES",
                   help="builder workspace limit, e.g. 4GiB")
    b.add_argument("--optimization-level", type=int, default=DEFAULT_OPTIMIZATION_LEVEL,
                   metavar=f"0-{MAX_OPTIMIZATION_LEVEL}",
                   help=f"builder optimization level (default {DEFAULT_OPTIMIZATION_LEVEL})")
    b.add_argument("--hardware-compatible", action="store_true",
                   help="one plan for every Ampere-or-newer GPU (AMPERE_PLUS)")
    b.add_argument("--version-compatible", action="store_true",
                   help="a plan later TensorRT versions and tensorrt-lean can run")
    b.add_argument("--exclude-lean-runtime", action="store_true",
                   help="with --version-compatible: leave the lean runtime out of the plan")
    b.add_argument("--timing-cache", metavar="PATH",
                   help="TensorRT timing cache to start from and update")
    b.add_argument("--detailed", action="store_true",
                   help="keep per-layer detail in the plan (for inspect --layers)")
    b.add_argument("--plugins", action="append", default=[], metavar="LIB",
                   help="a TensorRT plugin library to load before parsing (repeatable)")
    loud = b.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="count", default=0,
                      help="TensorRT's build log: -v info, -vv verbose (default: warnings)")
    loud.add_argument("-q", "--quiet", action="store_true",
                      help="only TensorRT's errors")
    return p


def main(argv: Sequence[str] | None = None, stream: TextIO | None = None) -> int:
    """Run one subcommand; returns 0, or 2 after printing one line for a user error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = stream or sys.stdout
    if args.version:
        print(versions_text(), file=out)
        return 0
    if args.command is None:
        parser.error("a command is required: inspect or build (or -V)")
    try:
        if args.command == "inspect":
            return inspect(args, out)
        return build(args, out)
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


# ---------------------------------------------------------------------------------------------
# inspect


def _read(uri: str) -> bytes:
    try:
        return read_bytes(uri)
    except StorageError as exc:
        raise SpecError(f"{exc}; check the path") from exc


def _tensor_lines(kind: str, metas: Sequence[TensorMeta]) -> list[str]:
    width = max((len(m.name) for m in metas), default=0)
    return [f"{kind}:"] + [f"  {m.name:<{width}}  {m.describe()}" for m in metas]


def onnx_summary(uri: str, data: bytes, info: ModelInfo) -> dict[str, Any]:
    types = model_types(data, f"'{uri}'")
    return {"model": uri, "format": "onnx", "bytes": len(data), "ir_version": info.ir_version,
            "opsets": info.opsets, "producer": info.producer,
            "inputs": [m.to_json() for m in info.inputs],
            "outputs": [m.to_json() for m in info.outputs],
            "float_types": sorted(types.floats), "quantized": sorted(types.quantized),
            "external_data": external_data_locations(data, f"'{uri}'")}


def _read_model(uri: str, weights: str | None) -> bytes:
    """The bytes at `uri`, or, with Caffe `weights`, the ONNX model converted from the pair."""
    data = _read(uri)
    if weights:
        from jobs.caffe import convert_caffe

        data = convert_caffe(data, _read(weights), f"Caffe model '{uri}' with weights '{weights}'")
    return data


def versions_text() -> str:
    """onnx2trt -V: the versions that decide what a model and a plan may use."""
    from importlib import metadata

    import onnx

    from jobs.caffe import converter_version as caffe_version
    from workers.onnx_precision import converter_version

    lines = [f"onnx {onnx.__version__}: IR version {onnx.IR_VERSION}, opset "
             f"{onnx.defs.onnx_opset_version()}"]
    for name in ("tensorrt", "tensorrt_lean", "tensorrt_dispatch"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        if hasattr(module, "Runtime"):  # not the type stubs' empty namespace package
            kind = "builds and runs plans" if hasattr(module, "Builder") else "runs plans"
            lines.append(f"{name} {getattr(module, '__version__', '?')} ({kind})")
    if not any(line.startswith("tensorrt") for line in lines):
        lines.append("tensorrt: not installed")
    for dist in ("onnxruntime", "onnxruntime-gpu", "cuda-python"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            lines.append(f"{dist} {metadata.version(dist)}")
    lines += [f"fp16/bf16 conversion: {converter_version()}", f"Caffe conversion: {caffe_version()}"]
    return "\n".join(lines)


def _write_text(target: str, text: str, out: TextIO) -> None:
    if target == "-":
        print(text, file=out)
    else:
        write_bytes_atomic(target, text.encode())


def model_text(data: bytes, weights: bool) -> str:
    """The model in ONNX's text syntax; without `weights`, initializers keep their names, types
    and shapes and say their values were left out."""
    import onnx

    model = onnx.load_model_from_string(data)
    if not weights:
        from workers.onnx_precision import iter_graphs

        for graph in iter_graphs(model.graph):
            for init in graph.initializer:
                for field in ("raw_data", "float_data", "int32_data", "int64_data",
                              "double_data", "uint64_data", "string_data", "external_data"):
                    init.ClearField(field)
                # The text syntax prints an external tensor as its location: say what it is.
                init.data_location = onnx.TensorProto.EXTERNAL
                entry = init.external_data.add()
                entry.key, entry.value = "location", "(weights left out)"
    return str(onnx.printer.to_text(model))


def layer_lines(data: bytes) -> list[str]:
    """onnx2trt -l for an ONNX model: each node, its operator and its outputs' inferred shapes."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load_model_from_string(data))
    known = {v.name: v for v in [*model.graph.value_info, *model.graph.output, *model.graph.input]}

    def shape(name: str) -> str:
        value = known.get(name)
        if value is None or not value.type.HasField("tensor_type"):
            return f"{name} ?"
        tensor = value.type.tensor_type
        dims = ",".join(d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?")
                        for d in tensor.shape.dim)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name \
            if tensor.elem_type else "?"
        return f"{name} {dtype} [{dims}]"

    return [f"{i}: {node.name or '(unnamed)'}  [{node.op_type}]  -> "
            + ", ".join(shape(o) for o in node.output)
            for i, node in enumerate(model.graph.node)]


def inspect(args: argparse.Namespace, out: TextIO) -> int:
    data = _read_model(args.model, args.weights)
    try:
        info = describe_onnx(data, source=f"'{args.model}'")
    except SpecError:
        info = None
    if info is not None:
        if args.text or args.text_with_weights:
            for target, weights in ((args.text, False), (args.text_with_weights, True)):
                if target:
                    _write_text(target, model_text(data, weights), out)
            return 0
        summary = onnx_summary(args.model, data, info)
        if args.layers:
            summary["layers"] = layer_lines(data)
        if args.json:
            print(json.dumps(summary, indent=2), file=out)
            return 0
        opsets = ", ".join(f"{domain} {version}" for domain, version in sorted(info.opsets.items()))
        lines = [f"model: {args.model} (ONNX, {len(data):,} bytes)",
                 f"ir_version: {info.ir_version}", f"opsets: {opsets}",
                 f"producer: {info.producer or '(none)'}",
                 *_tensor_lines("inputs", info.inputs), *_tensor_lines("outputs", info.outputs),
                 f"types: {', '.join(summary['float_types']) or 'no float tensors'}"
                 + (f"; quantized (Q/DQ): {', '.join(summary['quantized'])}"
                    if summary["quantized"] else "")]
        if summary["external_data"]:
            lines.append(f"external data: {', '.join(summary['external_data'])}")
        if args.layers:
            lines.append(f"layers ({len(summary['layers'])}):")
            lines += [f"  {line}" for line in summary["layers"]]
        print("\n".join(lines), file=out)
        return 0
    if args.text or args.text_with_weights:
        raise SpecError(f"--text writes an ONNX model as text, and '{args.model}' is not an ONNX "
                        "model (a TensorRT plan?); pass the .onnx it was built from")
    return _inspect_plan(args, data, out)


def _sidecar(uri: str) -> dict[str, Any] | None:
    try:
        raw = read_bytes(f"{uri}.json")
    except StorageError:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _inspect_plan(args: argparse.Namespace, data: bytes, out: TextIO) -> int:
    from workers.backends.tensorrt import import_tensorrt

    sidecar = _sidecar(args.model)
    try:
        trt_module = import_tensorrt()
    except MissingDependencyError as exc:
        if args.layers or sidecar is None:
            raise MissingDependencyError(
                f"'{args.model}' is not an ONNX model, so it is read as a TensorRT plan, which "
                f"needs TensorRT ({exc}); or inspect the ONNX model it was built from") from exc
        trt_module = None
    summary: dict[str, Any] = {"model": args.model, "format": "tensorrt-plan", "bytes": len(data)}
    if sidecar is not None:
        summary["sidecar"] = sidecar
    if trt_module is not None:
        summary.update(_engine_summary(trt_module, data, args.model, args.layers,
                                       args.trust_host_code))
    if args.json:
        print(json.dumps(summary, indent=2, default=str), file=out)
        return 0
    lines = [f"model: {args.model} (TensorRT plan, {plan_nbytes_text(len(data))})"]
    if sidecar is not None:
        key = sidecar.get("key", {})
        build = key.get("build", {})
        lines += [f"built: TensorRT {key.get('tensorrt')} for {key.get('target')} on "
                  f"{sidecar.get('gpu') or '?'} in {sidecar.get('build_seconds')}s "
                  f"({sidecar.get('created')})",
                  f"precision: {build.get('precision')} ({sidecar.get('precision_how')})",
                  f"profiles (min, opt, max rows): {build.get('profiles')}",
                  f"fingerprint: {sidecar.get('fingerprint')}"]
    if "inputs" in summary:
        lines += [f"tensorrt: {summary['tensorrt']}",
                  *_plain_tensor_lines("inputs", summary["inputs"]),
                  *_plain_tensor_lines("outputs", summary["outputs"])]
    elif sidecar is not None:
        lines += [*_plain_tensor_lines("inputs", sidecar.get("inputs", [])),
                  *_plain_tensor_lines("outputs", sidecar.get("outputs", [])),
                  "(from the sidecar: TensorRT is not installed here)"]
    if "layers" in summary:
        lines.append(f"layers ({len(summary['layers'])}):")
        lines += [f"  {line}" for line in summary["layers"]]
    print("\n".join(lines), file=out)
    return 0


def _plain_tensor_lines(kind: str, tensors: Sequence[dict[str, Any]]) -> list[str]:
    width = max((len(str(t.get("name"))) for t in tensors), default=0)
    out = [f"{kind}:"]
    for t in tensors:
        dims = ",".join("?" if d is None else str(d) for d in t.get("shape", []))
        extra = f"  profile {t['profile']}" if t.get("profile") else ""
        out.append(f"  {t.get('name')!s:<{width}}  {t.get('dtype')} [{dims}]{extra}")
    return out


def _engine_summary(trt_module: Any, data: bytes, uri: str, layers: bool,
                    trust_host_code: bool = False) -> dict[str, Any]:
    """I/O, profiles and (with `layers`) the layer list of a deserialized plan."""
    from workers.backends.tensorrt import import_cuda, numpy_dtype, process_logger

    if layers:
        require_engine_inspector(trt_module)
    cuda = import_cuda()
    if cuda.device_count() < 1:
        raise SpecError(f"reading plan '{uri}' needs a CUDA GPU (TensorRT deserializes it onto "
                        "one), and none is visible here; inspect it on a GPU node")
    cuda.set_device(0)
    logger = process_logger(trt_module)
    runtime: trt.Runtime = trt_module.Runtime(logger.trt_logger)
    if trust_host_code and hasattr(runtime, "engine_host_code_allowed"):
        runtime.engine_host_code_allowed = True
    with logger.capture() as log:
        engine: trt.ICudaEngine | None = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise SpecError(f"'{uri}' is neither an ONNX model nor a plan this TensorRT "
                        f"({getattr(trt_module, '__version__', '?')}) can load: "
                        f"{log.last_errors()}; a version-compatible plan with the lean "
                        "runtime inside needs --trust-host-code")
    tensors: dict[str, list[dict[str, Any]]] = {"inputs": [], "outputs": []}
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        dims = engine.get_tensor_shape(name)
        entry: dict[str, Any] = {
            "name": name, "dtype": numpy_dtype(trt_module, engine.get_tensor_dtype(name), name).name,
            "shape": [None if int(dims[i]) < 0 else int(dims[i]) for i in range(len(dims))]}
        if engine.get_tensor_mode(name) == trt_module.TensorIOMode.INPUT:
            if any(d is None for d in entry["shape"]):
                entry["profile"] = [
                    [[int(s[i]) for i in range(len(s))]
                     for s in engine.get_tensor_profile_shape(name, p)]
                    for p in range(engine.num_optimization_profiles)]
            tensors["inputs"].append(entry)
        else:
            tensors["outputs"].append(entry)
    summary: dict[str, Any] = {"tensorrt": str(getattr(trt_module, "__version__", "?")),
                               **tensors, "profiles": engine.num_optimization_profiles}
    if layers:
        inspector: trt.EngineInspector = engine.create_engine_inspector()
        info = json.loads(inspector.get_engine_information(trt_module.LayerInformationFormat.JSON))
        summary["layers"] = [_layer_line(layer) for layer in info.get("Layers", [])]
    return summary


def require_engine_inspector(trt_module: Any) -> None:
    """Refuse `--layers` where TensorRT has no EngineInspector (the lean and dispatch runtimes)."""
    if not hasattr(trt_module, "EngineInspector"):
        raise MissingDependencyError(
            f"--layers lists a plan's layers with TensorRT's EngineInspector, which "
            f"{trt_module.__name__} {getattr(trt_module, '__version__', '?')} (a runtime-only "
            "package) does not have; install the full package here (pip install "
            "'.[tensorrt-cu12]' or '.[tensorrt-cu13]'), or drop --layers")


def _layer_line(layer: Any) -> str:
    """One layer of the inspector's JSON: names only, or details with --detailed plans."""
    if not isinstance(layer, dict):
        return str(layer)
    text = str(layer.get("Name", "?"))
    kind = layer.get("LayerType")
    if kind:
        text += f"  [{kind}]"
    tactic = layer.get("TacticName")
    if tactic:
        text += f"  {tactic}"
    return text


# ---------------------------------------------------------------------------------------------
# build


def build_config_from_args(args: argparse.Namespace) -> BuildConfig:
    for flag in ("max_batch", "opt_batch", "min_batch"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SpecError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    opt = args.opt_batch if args.opt_batch is not None else args.max_batch
    if not args.min_batch <= opt <= args.max_batch:
        raise SpecError(f"batch sizes must satisfy --min-batch <= --opt-batch <= --max-batch, got "
                        f"{args.min_batch} <= {opt} <= {args.max_batch}")
    workspace = parse_bytes(args.workspace, "--workspace") if args.workspace else None
    return BuildConfig(precision=args.precision, profiles=((args.min_batch, opt, args.max_batch),),
                       workspace=workspace, optimization_level=args.optimization_level,
                       hardware_compatible=args.hardware_compatible,
                       version_compatible=args.version_compatible,
                       exclude_lean_runtime=args.exclude_lean_runtime,
                       detailed_profiling=args.detailed)


def build(args: argparse.Namespace, out: TextIO) -> int:
    from workers.backends.tensorrt import import_tensorrt, process_logger
    from workers.plan_build import build_plan, cuda_runtime_major
    from workers.plugins import digest_plugins

    config = dataclasses.replace(build_config_from_args(args),
                                 plugins=digest_plugins(args.plugins))
    data = _read_model(args.model, args.weights)
    source = f"model '{args.model}'"
    try:
        trt_module = import_tensorrt(builder=True)
    except MissingDependencyError:
        pass  # build_plan says so, after the checks that need no TensorRT
    else:
        severity = trt_module.ILogger
        process_logger(trt_module).echo_level = int(
            severity.ERROR if args.quiet else severity.VERBOSE if args.verbose > 1
            else severity.INFO if args.verbose else severity.WARNING)
    locations = external_data_locations(data, source)
    external = read_external_data(args.model, locations) if locations else {}
    timing = None
    if args.timing_cache:
        try:
            timing = read_bytes(args.timing_cache)
        except StorageError:
            timing = None  # first build with this cache file
    result = build_plan(data, config, timing_cache=timing, external_data=external, source=source)
    key = PlanKey(model_sha256=digest(data),
                  external_data=tuple((loc, digest(b)) for loc, b in sorted(external.items())),
                  tensorrt=result.tensorrt, cuda_major=cuda_runtime_major(),
                  target=target_key(result.capability, config.hardware_compatible,
                                    result.gpu_name),
                  build=config, conversion=result.conversion)
    name = args.output.rstrip("/").rsplit("/", 1)[-1]
    sidecar = sidecar_for(key, result.plan, name, result.info())
    write_bytes_atomic(args.output, result.plan)
    write_bytes_atomic(f"{args.output}.json", json.dumps(sidecar, indent=2).encode())
    if args.timing_cache and result.timing_cache:
        write_bytes_atomic(args.timing_cache, result.timing_cache)
    print(f"built {args.output} ({plan_nbytes_text(len(result.plan))}) in {result.seconds:.1f}s: "
          f"TensorRT {result.tensorrt}, {key.target} ({result.gpu_name}), {config.precision} "
          f"via {result.precision_how}; fingerprint {key.fingerprint[:12]}", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
