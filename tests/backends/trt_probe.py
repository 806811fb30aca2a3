"""Run inside one set of real TensorRT bindings (see .ci/trt_bindings.py); print what it found.

    LD_LIBRARY_PATH=DEST/stub PYTHONPATH=DEST/trt10:. python -m tests.backends.trt_probe

Checks every TensorRT name and parameter this project's code uses against the bindings'
pybind11 signatures, and runs the parts of our code that need no GPU against the real module:
the API probe, dtype mapping, the process logger (a real ILogger subclass), the constructors'
argument conversion (the stub factories return NULL, so the binding raises "returned nullptr"
after accepting the arguments), plugin registration calls, and the lean runtime's refusals.
Prints one JSON object: {"module", "version", "problems": [...], "facts": {...}}.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

# (attribute path, parameter names its signature must have, or None for "exists")
RUNTIME_API: list[tuple[str, tuple[str, ...] | None]] = [
    ("Runtime.__init__", ("logger",)),
    ("Runtime.deserialize_cuda_engine", ("serialized_engine",)),
    ("Runtime.engine_host_code_allowed", None),
    ("ICudaEngine.num_io_tensors", None),
    ("ICudaEngine.num_optimization_profiles", None),
    ("ICudaEngine.get_tensor_name", ("index",)),
    ("ICudaEngine.get_tensor_location", ("name",)),
    ("ICudaEngine.get_tensor_shape", ("name",)),
    ("ICudaEngine.get_tensor_dtype", ("name",)),
    ("ICudaEngine.get_tensor_mode", ("name",)),
    ("ICudaEngine.get_tensor_profile_shape", ("name", "profile_index")),
    ("ICudaEngine.create_execution_context", None),
    ("IExecutionContext.set_input_shape", ("name", "shape")),
    ("IExecutionContext.get_tensor_shape", ("name",)),
    ("IExecutionContext.set_tensor_address", ("name", "memory")),
    ("IExecutionContext.execute_async_v3", ("stream_handle",)),
    ("IExecutionContext.set_optimization_profile_async", ("profile_index", "stream_handle")),
    ("TensorLocation.DEVICE", None),
    ("TensorIOMode.INPUT", None),
    ("TensorIOMode.OUTPUT", None),
    ("ILogger.log", ("severity", "msg")),
    ("ILogger.ERROR", None),
    ("ILogger.WARNING", None),
    ("ILogger.INFO", None),
    ("ILogger.VERBOSE", None),
    ("get_plugin_registry", None),
    ("IPluginRegistry.load_library", ("plugin_path",)),
    ("Dims", None),
    ("nptype", None),
]
BUILDER_API: list[tuple[str, tuple[str, ...] | None]] = [
    ("Builder.__init__", ("logger",)),
    ("Builder.create_network", ("flags",)),
    ("Builder.create_builder_config", None),
    ("Builder.create_optimization_profile", None),
    ("Builder.build_serialized_network", ("network", "config")),
    ("NetworkDefinitionCreationFlag.STRONGLY_TYPED", None),
    ("OnnxParser.__init__", ("network", "logger")),
    ("OnnxParser.parse", ("model",)),
    ("OnnxParser.parse_from_file", ("model",)),
    ("OnnxParser.num_errors", None),
    ("OnnxParser.get_error", ("index",)),
    ("ParserError.node", None),
    ("ParserError.node_name", None),
    ("ParserError.node_operator", None),
    ("ParserError.code", None),
    ("ParserError.desc", None),
    ("IBuilderConfig.set_memory_pool_limit", ("pool", "pool_size")),
    ("MemoryPoolType.WORKSPACE", None),
    ("IBuilderConfig.builder_optimization_level", None),
    ("IBuilderConfig.set_flag", ("flag",)),
    ("IBuilderConfig.clear_flag", ("flag",)),
    ("IBuilderConfig.hardware_compatibility_level", None),
    ("HardwareCompatibilityLevel.AMPERE_PLUS", None),
    ("IBuilderConfig.profiling_verbosity", None),
    ("ProfilingVerbosity.DETAILED", None),
    ("IBuilderConfig.add_optimization_profile", ("profile",)),
    ("IBuilderConfig.create_timing_cache", ("serialized_timing_cache",)),
    ("IBuilderConfig.set_timing_cache", ("cache", "ignore_mismatch")),
    ("IBuilderConfig.get_timing_cache", None),
    ("IBuilderConfig.plugins_to_serialize", None),
    ("ITimingCache.serialize", None),
    ("BuilderFlag.TF32", None),
    ("BuilderFlag.VERSION_COMPATIBLE", None),
    ("BuilderFlag.EXCLUDE_LEAN_RUNTIME", None),
    ("IOptimizationProfile.set_shape", ("input", "min", "opt", "max")),
    ("INetworkDefinition.num_inputs", None),
    ("INetworkDefinition.get_input", ("index",)),
    ("INetworkDefinition.num_outputs", None),
    ("INetworkDefinition.get_output", ("index",)),
    ("ITensor.name", None),
    ("ITensor.dtype", None),
    ("ITensor.shape", None),
    ("ICudaEngine.create_engine_inspector", None),
    ("EngineInspector.get_engine_information", ("format",)),
    ("LayerInformationFormat.JSON", None),
    ("init_libnvinfer_plugins", ("logger", "namespace")),
]


def _resolve(module: Any, path: str) -> Any:
    obj = module
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def check_api(module: Any, api: list[tuple[str, tuple[str, ...] | None]]) -> list[str]:
    problems = []
    for path, params in api:
        try:
            obj = _resolve(module, path)
        except AttributeError:
            problems.append(f"{path}: missing")
            continue
        if params:
            doc = getattr(obj, "__doc__", "") or ""
            for param in params:
                if not re.search(rf"\b{param}: ", doc):
                    problems.append(f"{path}: no parameter '{param}' in {doc.splitlines()[:1]}")
    return problems


def accepts_arguments(factory: Any, *args: Any) -> str:
    """'accepted' when the binding converted the arguments (the stub factory then returns NULL)."""
    try:
        factory(*args)
    except TypeError as exc:
        return "accepted" if "nullptr" in str(exc) else f"refused: {exc}"
    return "constructed"


def probe(name: str) -> dict[str, Any]:
    import importlib

    module = importlib.import_module(name)
    full = hasattr(module, "Builder")
    problems = check_api(module, RUNTIME_API + (BUILDER_API if full else []))
    facts: dict[str, Any] = {"full": full, "engine_inspector": hasattr(module, "EngineInspector"),
                             "init_libnvinfer_plugins": hasattr(module, "init_libnvinfer_plugins")}

    from workers.backends.tensorrt import import_tensorrt, numpy_dtype, process_logger
    from workers.errors import MissingDependencyError
    from workers.plan_build import TrtApi

    facts["import_tensorrt"] = import_tensorrt().__name__
    try:
        import_tensorrt(builder=True)
        facts["import_tensorrt_builder"] = "ok"
    except MissingDependencyError as exc:
        facts["import_tensorrt_builder"] = str(exc)
    if full:  # (the lean runtime has no BuilderFlag: local_gpu_facts probes full modules only)
        api = TrtApi.probe(module)
        facts["precision_flags"] = api.precision_flags
        facts["strongly_typed_flag"] = api.strongly_typed_flag
    facts["dtypes"] = {d: numpy_dtype(module, getattr(module.DataType, d), d).name
                       for d in ("FLOAT", "HALF", "BF16", "INT8", "INT32", "INT64", "BOOL")}
    logger = process_logger(module)
    facts["one_logger"] = process_logger(module) is logger
    logger.echo_level = -1  # keep the probe's stdout JSON only
    with logger.capture() as capture:
        logger.trt_logger.log(module.ILogger.WARNING, "a warning")
        logger.trt_logger.log(module.ILogger.ERROR, "an error")
        logger.trt_logger.log(module.ILogger.INFO, "information")
    facts["captured"] = {"warnings": capture.warnings, "errors": list(capture.errors)}
    facts["runtime_arguments"] = accepts_arguments(module.Runtime, logger.trt_logger)
    if full:
        facts["builder_arguments"] = accepts_arguments(module.Builder, logger.trt_logger)
        facts["init_plugins_returns"] = module.init_libnvinfer_plugins(logger.trt_logger, "")
    from workers.errors import BackendError
    from workers.plugins import register_tensorrt_plugins

    # Our plugin registration against the real module: init_libnvinfer_plugins (full only)
    # takes our logger; with libraries, the stub's registry is NULL and we say so.
    facts["register_no_libraries"] = register_tensorrt_plugins(module, logger.trt_logger, [])
    try:
        register_tensorrt_plugins(module, logger.trt_logger, ["/nonexistent/libplugin.so"])
        facts["register_library"] = "loaded"
    except BackendError as exc:
        facts["register_library"] = str(exc)
    from jobs.plan import require_engine_inspector

    try:
        require_engine_inspector(module)
        facts["layers"] = "ok"
    except MissingDependencyError as exc:
        facts["layers"] = str(exc)
    return {"module": name, "version": module.__version__, "problems": problems, "facts": facts}


if __name__ == "__main__":
    import importlib

    found = None
    for candidate in ("tensorrt", "tensorrt_lean"):
        try:
            # `tensorrt-stubs` alone makes `tensorrt` an empty namespace package.
            if hasattr(importlib.import_module(candidate), "Runtime"):
                found = candidate
                break
        except ImportError:
            continue
    if found is None:
        raise SystemExit("no TensorRT bindings on PYTHONPATH")
    print(json.dumps(probe(found)))
    sys.exit(0)
