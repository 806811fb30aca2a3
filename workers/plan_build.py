"""Building a TensorRT plan from an ONNX model, on a GPU node.

The pure parts (build settings, optimization-profile shapes, how a precision is honoured on the
installed TensorRT) run anywhere and fail early with a message naming the fix; `build_plan` runs
the ONNX parser and the builder and needs TensorRT and a GPU. TensorRT 10 can lower an FP32
network with precision flags (weak typing); TensorRT 11 removed those flags and calibrators and
builds only strongly typed networks, so the model must carry its types: FP16/BF16 are converted
before parsing (`workers.onnx_precision`), INT8/FP8 must arrive as Q/DQ nodes.
"""

from __future__ import annotations

import math
import os
import re
import socket
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from workers.errors import BackendError, SpecError
from workers.tensors import TensorMeta, describe_onnx

if TYPE_CHECKING:
    import tensorrt as trt

    from workers.onnx_precision import ModelTypes

PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8")
MAX_OPTIMIZATION_LEVEL = 5
DEFAULT_OPTIMIZATION_LEVEL = 3
AMPERE_PLUS = "ampere_plus"
Profile = tuple[int, int, int]  # (min, opt, max) rows of the batch dimension

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def parse_bytes(value: str | int, name: str = "workspace") -> int:
    """`4294967296`, `4GiB`, `512MiB`, `2G` -> bytes; G/M/K are decimal, GiB/MiB/KiB binary."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else ""
        if not match or unit not in _UNITS:
            raise SpecError(f"{name} must be a size in bytes such as 4294967296, 4GiB or 512MiB, "
                            f"got {value!r}")
        number = int(float(match.group(1)) * _UNITS[unit])
    if number < 1:
        raise SpecError(f"{name} must be at least 1 byte, got {value!r}")
    return number


@dataclass(frozen=True)
class BuildConfig:
    """How to build a plan; a value that crosses from the driver to the Ray task that builds.

    `profiles` are (min, opt, max) rows of the batch dimension, one optimization profile each;
    `lengths`, when the model's inputs have dynamic dims beyond the batch (token widths), are
    (min, opt, max) of those dims, one per profile (`workers.batching.TokenBudget.profiles`
    chooses them from the data's token lengths).
    `workspace=None` leaves TensorRT's default (the GPU's memory); `exclude_lean_runtime` keeps
    the lean runtime out of a version-compatible plan (workers then run it with tensorrt-lean
    of the same version).
    """

    precision: str = "fp32"
    profiles: tuple[Profile, ...] = ((1, 256, 256),)
    lengths: tuple[Profile, ...] = ()
    workspace: int | None = None
    optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL
    hardware_compatible: bool = False
    version_compatible: bool = False
    exclude_lean_runtime: bool = False
    detailed_profiling: bool = False
    #: `--plugins`: (uri, sha256) of each TensorRT plugin library, registered before parsing;
    #: version-compatible plans serialize them (`plugins_to_serialize`)
    plugins: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise SpecError(f"precision must be one of {', '.join(PRECISIONS)}, "
                            f"got {self.precision!r}")
        if not self.profiles:
            raise SpecError("a plan needs at least one optimization profile (min, opt, max rows)")
        for what, profile in ([("batch sizes", p) for p in self.profiles]
                              + [("token widths", p) for p in self.lengths]):
            if (len(profile) != 3 or any(not isinstance(n, int) or isinstance(n, bool) or n < 1
                                         for n in profile)
                    or not profile[0] <= profile[1] <= profile[2]):
                raise SpecError(f"optimization profile {tuple(profile)} must be three {what} "
                                "min <= opt <= max, each >= 1; for example (1, 256, 256)")
        if self.lengths and len(self.lengths) != len(self.profiles):
            raise SpecError(f"{len(self.lengths)} token-length profile(s) for "
                            f"{len(self.profiles)} batch profile(s); give one of each per "
                            "optimization profile")
        if self.workspace is not None and (not isinstance(self.workspace, int)
                                           or isinstance(self.workspace, bool)
                                           or self.workspace < 1):
            raise SpecError(f"workspace must be a number of bytes >= 1, got {self.workspace!r}")
        level = self.optimization_level
        if (not isinstance(level, int) or isinstance(level, bool)
                or not 0 <= level <= MAX_OPTIMIZATION_LEVEL):
            raise SpecError(f"optimization_level must be an integer from 0 to "
                            f"{MAX_OPTIMIZATION_LEVEL}, got {level!r}")
        if self.exclude_lean_runtime and not self.version_compatible:
            raise SpecError("exclude_lean_runtime only applies to version-compatible plans; "
                            "add --version-compatible or drop --exclude-lean-runtime")
        if self.precision == "fp8" and self.hardware_compatible:
            raise SpecError("precision fp8 cannot be built hardware-compatible: the AMPERE_PLUS "
                            "level only uses kernels Ampere GPUs have, and Ampere has no FP8; "
                            "drop --hardware-compatible (one plan per GPU type) or use fp16")

    @classmethod
    def for_batch(cls, max_batch: int, **kwargs: Any) -> BuildConfig:
        """One profile from 1 row to `max_batch` rows, tuned for full batches."""
        return cls(profiles=((1, max_batch, max_batch),), **kwargs)

    @property
    def max_batch(self) -> int:
        return max(p[2] for p in self.profiles)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        # Lists, as JSON reads them back: the cache compares a sidecar's key with this.
        out["profiles"] = [list(p) for p in self.profiles]
        out["plugins"] = [list(p) for p in self.plugins]
        out["lengths"] = [list(p) for p in self.lengths]
        return out


def target_key(capability: tuple[int, int], hardware_compatible: bool, gpu_name: str = "") -> str:
    """Which plan a GPU runs: its compute capability and model (`sm_90-nvidia-h100-80gb-hbm3`),
    or `ampere_plus` for a hardware-compatible plan.

    TensorRT supports a plan only on the device model that built it (its own words: using it on
    another "is likely to affect performance or even cause errors or deadlock"), so an A10 and
    an A40 (both 8.6) get a plan each; hardware-compatible plans are made to be shared.
    """
    if hardware_compatible:
        return AMPERE_PLUS
    key = f"sm_{capability[0]}{capability[1]}"
    model = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")
    return f"{key}-{model}" if model else key


# ---------------------------------------------------------------------------------------------
# Optimization profiles


def profile_shapes(inputs: Sequence[TensorMeta], config: BuildConfig, source: str = "model"
                   ) -> list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]]:
    """Per profile: input name -> (min, opt, max) shape, for inputs with a dynamic batch.

    Inputs with a fixed first dimension need no profile, but that batch must fit the job's
    batch size; dynamic dimensions beyond the batch take `config.lengths`, and without them
    have no size to build for and are refused.
    """
    dynamic: list[TensorMeta] = []
    for meta in inputs:
        if any(d is None for d in meta.row_shape) and config.lengths:
            if meta.shape[0] is not None:
                raise SpecError(f"{source} input '{meta.name}' is {meta.describe()}: a fixed "
                                "batch with dynamic widths; export it with a dynamic batch")
            dynamic.append(meta)
            continue
        if any(d is None for d in meta.row_shape):
            raise SpecError(
                f"{source} input '{meta.name}' is {meta.describe()}: dimensions beyond the batch "
                "are dynamic, and a TensorRT plan needs their sizes; export the model with fixed "
                "sizes for every dimension but the first")
        batch = meta.shape[0]
        if batch is None:
            dynamic.append(meta)
        elif batch != config.max_batch:
            raise SpecError(
                f"{source} input '{meta.name}' has a fixed batch dimension of {batch} "
                f"({meta.describe().replace('[N', f'[{batch}')}), but the plan is built for "
                f"batches of up to {config.max_batch} rows; export the model with a dynamic "
                f"batch dimension (torch.onnx.export(..., dynamic_axes={{'{meta.name}': "
                f"{{0: 'N'}}}})) or set the batch size to {batch}")
    out = []
    for index, (lo, opt, hi) in enumerate(config.profiles):
        shapes = {}
        for meta in dynamic:
            # A dynamic dim beyond the batch is a token width: this profile's range of them.
            width = config.lengths[index] if config.lengths else (0, 0, 0)
            low, best, high = ([w if d is None else int(d) for d in meta.row_shape]
                               for w in width)
            shapes[meta.name] = ((lo, *low), (opt, *best), (hi, *high))
        out.append(shapes)
    return out if dynamic else []


# ---------------------------------------------------------------------------------------------
# Precision


@dataclass(frozen=True)
class TrtApi:
    """What the installed TensorRT offers, probed rather than assumed from the version number."""

    version: str
    precision_flags: bool       # BuilderFlag.FP16 and friends (TensorRT 10; removed in 11)
    strongly_typed_flag: bool   # NetworkDefinitionCreationFlag.STRONGLY_TYPED

    @property
    def major(self) -> int:
        head = self.version.split(".", 1)[0]
        return int(head) if head.isdigit() else 0

    @classmethod
    def probe(cls, module: Any) -> TrtApi:
        return cls(version=str(getattr(module, "__version__", "unknown")),
                   precision_flags=hasattr(module.BuilderFlag, "FP16"),
                   strongly_typed_flag=hasattr(module.NetworkDefinitionCreationFlag,
                                               "STRONGLY_TYPED"))


@dataclass(frozen=True)
class PrecisionPlan:
    """How a requested precision is honoured: network typing, builder flags, conversion."""

    strongly_typed: bool
    flags: tuple[str, ...] = ()
    convert_to: str | None = None
    clear_tf32: bool = False
    how: str = ""


def plan_precision(precision: str, api: TrtApi, types: ModelTypes,
                   capability: tuple[int, int] | None = None, hardware_compatible: bool = False,
                   source: str = "model") -> PrecisionPlan:
    """Decide how to build `precision` on this TensorRT for a model carrying `types`.

    Raises SpecError, naming the fix, when the choice cannot be honoured.
    """
    cc = f"{capability[0]}.{capability[1]}" if capability else ""
    if hardware_compatible and capability is not None and capability < (8, 0):
        raise SpecError(f"hardware-compatible plans (AMPERE_PLUS) need an Ampere or newer GPU "
                        f"(compute capability 8.0+), and this one is {cc}; drop "
                        "--hardware-compatible")
    if precision == "bf16" and capability is not None and capability < (8, 0):
        raise SpecError(f"precision bf16 needs compute capability 8.0+ (Ampere or newer), and "
                        f"this GPU is {cc}; use --precision fp16")
    if precision == "fp8" and capability is not None and capability < (8, 9):
        raise SpecError(f"precision fp8 needs compute capability 8.9+ (Ada or Hopper), and this "
                        f"GPU is {cc}; use --precision int8 or fp16")
    if precision in ("int8", "fp8"):
        if not types.carries(precision):
            found = (f" (it has {', '.join(sorted(types.quantized))} Q/DQ nodes)"
                     if types.quantized else "")
            raise SpecError(
                f"precision {precision} needs a model with explicit quantization "
                f"(QuantizeLinear/DequantizeLinear nodes producing {precision}), and {source} has "
                f"none{found}; quantize it with NVIDIA ModelOpt (python -m "
                f"modelopt.onnx.quantization --onnx_path MODEL.onnx --quantize_mode {precision} "
                f"--calibration_data DATA.npz) and pass the quantized model, or use --precision "
                f"fp16; calibration inside the build is not supported (TensorRT 11 removed it)")
        return PrecisionPlan(strongly_typed=True,
                             how=f"{precision} from the model's Q/DQ nodes (strongly typed)")
    if precision == "fp32":
        if api.major >= 11 or types.floats - {"fp32"} or types.quantized:
            return PrecisionPlan(strongly_typed=True, clear_tf32=True,
                                 how="the model's own types (strongly typed), TF32 off")
        return PrecisionPlan(strongly_typed=False, clear_tf32=True, how="fp32, TF32 off")
    # fp16 / bf16
    if types.computes_in(precision):
        return PrecisionPlan(strongly_typed=True,
                             how=f"the model's own {precision} weights and types (strongly typed)")
    partly = (f" (the model carries some {precision} tensors, and its fp32 weights are lowered "
              "too)" if types.carries(precision) else "")
    if api.precision_flags:
        flag = precision.upper()
        return PrecisionPlan(strongly_typed=False, flags=(flag,),
                             how=f"BuilderFlag.{flag} over the fp32 model (weakly typed: TensorRT "
                                 f"picks {precision} or fp32 per layer){partly}")
    if types.subgraphs:
        raise SpecError(
            f"TensorRT {api.version} has no {precision} builder flag (strong typing only), so the "
            f"model must carry {precision} types, and {source} has control-flow subgraphs the "
            f"built-in conversion does not rewrite; convert it with NVIDIA ModelOpt (python -m "
            f"modelopt.onnx.autocast --onnx_path MODEL.onnx --low_precision_type {precision}) "
            f"and pass the converted model, or use --precision fp32")
    return PrecisionPlan(strongly_typed=True, convert_to=precision,
                         how=f"model converted to {precision} before parsing (I/O kept fp32, "
                             f"reductions, Pow, Exp, Softmax and norms in fp32; TensorRT "
                             f"{api.version} has no precision flags){partly}")


# ---------------------------------------------------------------------------------------------
# GPU facts


@dataclass(frozen=True)
class GpuFacts:
    """What one GPU node reports: its GPU, and which TensorRT (if any) it can run or build with."""

    capability: tuple[int, int]
    gpu_name: str = ""
    tensorrt: str | None = None        # version of the runtime module that imports, if any
    tensorrt_module: str | None = None  # "tensorrt", "tensorrt_lean" or "tensorrt_dispatch"
    can_build: bool = False            # the full `tensorrt` package (with Builder) is present
    precision_flags: bool = False
    cuda_major: int | None = None
    host: str = ""
    problem: str | None = None         # why TensorRT is unusable here, when it is

    @property
    def api(self) -> TrtApi:
        return TrtApi(self.tensorrt or "unknown", self.precision_flags, True)

    @property
    def capability_text(self) -> str:
        return f"{self.capability[0]}.{self.capability[1]}"


def cuda_runtime_major() -> int | None:
    """Major version of the CUDA runtime cuda-python loads (12 for 12.x), or None without it."""
    from workers import cuda
    from workers.errors import MissingDependencyError

    try:
        runtime = cuda.runtime()
    except MissingDependencyError:
        return None
    return int(cuda.check(runtime.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")) // 1000


def gpu_name(device: int = 0) -> str:
    """The GPU's name for messages and sidecars ('' when it cannot be read)."""
    from workers import cuda

    try:
        return cuda.device_name(device)
    except BackendError:
        return ""


def local_gpu_facts(device: int = 0) -> GpuFacts:
    """Facts of this process's GPU `device` and TensorRT; runs on a GPU node (a Ray task)."""
    from workers import cuda
    from workers.backends.tensorrt import import_tensorrt
    from workers.errors import MissingDependencyError

    capability = tuple(cuda.compute_capability(device))
    version = module_name = problem = None
    can_build = flags = False
    try:
        module = import_tensorrt()
        version = str(getattr(module, "__version__", "unknown"))
        module_name = module.__name__
        can_build = hasattr(module, "Builder")
        flags = can_build and TrtApi.probe(module).precision_flags
    except MissingDependencyError as exc:
        problem = str(exc)
    except Exception as exc:  # a broken install (missing libnvinfer) raises OSError/RuntimeError
        problem = f"TensorRT does not import: {exc.__class__.__name__}: {exc}"
    return GpuFacts(capability=(int(capability[0]), int(capability[1])), gpu_name=gpu_name(device),
                    tensorrt=version, tensorrt_module=module_name, can_build=can_build,
                    precision_flags=flags, cuda_major=cuda_runtime_major(),
                    host=socket.gethostname(), problem=problem)


# ---------------------------------------------------------------------------------------------
# External weights


def external_data_locations(model: bytes, source: str = "model") -> list[str]:
    """Relative paths of the files an ONNX model keeps external tensors in (sorted, unique).

    Every reference counts (initializers, Constant values and other tensor attributes,
    subgraphs, functions): the ONNX parser resolves them all. See `workers.external_data`.
    """
    from workers.external_data import checked_locations

    return checked_locations(model, source)


# ---------------------------------------------------------------------------------------------
# The build


@dataclass
class BuildResult:
    """A built plan and what was learnt building it."""

    plan: bytes
    timing_cache: bytes | None
    seconds: float
    tensorrt: str
    capability: tuple[int, int]
    gpu_name: str
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]
    precision_how: str
    warnings: list[str] = field(default_factory=list)
    #: the build started from the timing cache it was given (False: none, or TensorRT refused it)
    timing_cache_loaded: bool = False
    #: the converter that made the fp16/bf16 model parsed (None: no conversion)
    conversion: str | None = None

    def info(self) -> dict[str, Any]:
        """JSON-ready description for the plan's sidecar."""
        return {"tensorrt": self.tensorrt, "compute_capability": list(self.capability),
                "gpu": self.gpu_name, "build_seconds": round(self.seconds, 3),
                "precision_how": self.precision_how, "conversion": self.conversion,
                "timing_cache_loaded": self.timing_cache_loaded,
                "builder_host": socket.gethostname(),
                "inputs": [m.to_json() for m in self.inputs],
                "outputs": [m.to_json() for m in self.outputs]}


def format_parser_errors(parser: trt.OnnxParser, source: str) -> str:
    """Every ONNX parser error with node index, node name, operator and description."""
    lines = []
    operators = []  # of errors that say no importer (or plugin) exists for the node's operator
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        node = int(error.node())
        name = error.node_name() if hasattr(error, "node_name") else ""
        operator = error.node_operator() if hasattr(error, "node_operator") else ""
        code = getattr(error.code(), "name", str(error.code()))
        where = (f"node {node}" + (f" '{name}'" if name else "") + (f" ({operator})" if operator else "")
                 if node >= 0 else "the model")
        lines.append(f"  {where}: {error.desc()} [{code}]")
        if code == "UNSUPPORTED_NODE" or re.search(r"(?i)no importer|plugin", str(error.desc())):
            operators.append(operator)
    unknown = sorted({op for op in operators if op})
    plugin_hint = (f"; an operator TensorRT has no importer for ({', '.join(unknown)}) may be a "
                   "plugin layer: load its library with --plugins LIB" if unknown else "")
    return (f"TensorRT cannot parse {source} ({parser.num_errors} error(s)):\n" + "\n".join(lines)
            + "\nchange or remove the unsupported node(s), or run with --backend onnxruntime"
            + plugin_hint)


def _dims(dims: trt.Dims) -> tuple[int | None, ...]:
    return tuple(None if int(dims[i]) < 0 else int(dims[i]) for i in range(len(dims)))


def build_plan(model: bytes, config: BuildConfig, *, timing_cache: bytes | None = None,
               external_data: Mapping[str, bytes] | None = None, source: str = "model",
               device: int = 0, storage_options: Mapping[str, Any] | None = None) -> BuildResult:
    """Parse `model` and build a plan on GPU `device`; needs the full `tensorrt` package.

    `external_data` maps each external-weights location (relative, as the model names it) to
    its bytes; `storage_options` reach the plugin libraries of `config.plugins`. Raises
    SpecError for what the user must change (unsupported nodes, shapes, precision),
    BackendError for what went wrong on the node.
    """
    # onnx_precision imports onnx, which takes a second: only a build needs it (the driver
    # imports this module for BuildConfig, on its way to starting).
    from workers.onnx_precision import converter_version, model_types

    info = describe_onnx(model, source=source)
    shapes = profile_shapes(info.inputs, config, source)
    types = model_types(model, source)
    if config.precision in ("int8", "fp8"):
        # Needs Q/DQ nodes whatever the TensorRT version: say so before importing it.
        plan_precision(config.precision, TrtApi("any", False, True), types, None, False, source)

    from workers import cuda
    from workers.backends.tensorrt import import_tensorrt, process_logger

    trt_module = import_tensorrt(builder=True)
    api = TrtApi.probe(trt_module)
    if cuda.device_count() < 1:
        raise BackendError("building a TensorRT plan needs a CUDA GPU, and none is visible here; "
                           "build on a GPU node (python -m jobs.plan build) or let the job do it")
    cuda.set_device(device)
    capability_raw = cuda.compute_capability(device)
    capability = (int(capability_raw[0]), int(capability_raw[1]))
    precision = plan_precision(config.precision, api, types, capability,
                               config.hardware_compatible, source)

    started = time.monotonic()
    logger = process_logger(trt_module)
    with logger.capture() as log, tempfile.TemporaryDirectory(prefix="trt-plugins-") as libs:
        from workers.plugins import local_plugin_files, register_tensorrt_plugins

        plugin_files = local_plugin_files(config.plugins, storage_options, libs)
        register_tensorrt_plugins(trt_module, logger.trt_logger, plugin_files)
        builder: trt.Builder = trt_module.Builder(logger.trt_logger)
        network = _parse(trt_module, builder, logger.trt_logger, model, precision, external_data,
                         source)
        builder_config = _builder_config(trt_module, builder, config, precision, shapes, api, log)
        if plugin_files and config.version_compatible:
            # The plan carries the libraries, for runtimes (lean ones too) that load it with host
            # code allowed; who may allow that is the plan trust rules' decision.
            builder_config.plugins_to_serialize = plugin_files
        loaded = _set_timing_cache(builder_config, timing_cache, log)
        serialized = builder.build_serialized_network(network, builder_config)
        if serialized is None:
            raise BackendError(f"TensorRT {api.version} could not build a plan for {source} on "
                               f"{gpu_name(device) or 'this GPU'} (compute capability "
                               f"{capability[0]}.{capability[1]}): {log.last_errors()}")
        plan = bytes(serialized)
        new_cache = builder_config.get_timing_cache()
        timing = bytes(new_cache.serialize()) if new_cache is not None else None
        inputs = _metas(trt_module, [network.get_input(i) for i in range(network.num_inputs)])
        outputs = _metas(trt_module, [network.get_output(i) for i in range(network.num_outputs)])
        warnings = list(log.warnings)
    return BuildResult(plan=plan, timing_cache=timing, seconds=time.monotonic() - started,
                       tensorrt=api.version, capability=capability, gpu_name=gpu_name(device),
                       inputs=inputs, outputs=outputs, precision_how=precision.how,
                       warnings=warnings, timing_cache_loaded=loaded,
                       conversion=converter_version() if precision.convert_to else None)


def _parse(trt_module: Any, builder: trt.Builder, trt_logger: Any, model: bytes,
           precision: PrecisionPlan, external_data: Mapping[str, bytes] | None,
           source: str) -> trt.INetworkDefinition:
    """The network the ONNX parser makes of `model` (converted first when `precision` says so)."""
    flags = 0
    strongly = getattr(trt_module.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if precision.strongly_typed and strongly is not None:
        flags |= 1 << int(strongly)
    network: trt.INetworkDefinition = builder.create_network(flags)
    parser: trt.OnnxParser = trt_module.OnnxParser(network, trt_logger)
    with tempfile.TemporaryDirectory(prefix="trt-build-") as tmp:
        path = None
        if external_data:
            # The parser resolves external weights relative to the model file's directory.
            for location, data in external_data.items():
                target = os.path.join(tmp, location)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "wb") as f:
                    f.write(data)
            path = os.path.join(tmp, "model.onnx")
            with open(path, "wb") as f:
                f.write(model)
        data = model
        if precision.convert_to:
            import onnx

            from workers.onnx_precision import convert_float

            proto = onnx.load(path) if path else onnx.load_model_from_string(model)
            data = convert_float(proto, precision.convert_to, source)
            path = None  # weights are inline after conversion
        # From the file when weights are external: the parser finds them next to it.
        ok = parser.parse_from_file(path) if path else parser.parse(data)
        if not ok:
            raise SpecError(format_parser_errors(parser, source))
    # The network keeps what it needs from the parser; the parser object is not needed after.
    return network


def _builder_config(trt_module: Any, builder: trt.Builder, config: BuildConfig,
                    precision: PrecisionPlan, shapes: list[dict[str, Any]], api: TrtApi,
                    log: Any) -> trt.IBuilderConfig:
    """The builder config: workspace, optimization level, precision flags, compatibility,
    profiling detail and one optimization profile per entry of `shapes`."""
    builder_config: trt.IBuilderConfig = builder.create_builder_config()
    if config.workspace is not None:
        builder_config.set_memory_pool_limit(trt_module.MemoryPoolType.WORKSPACE, config.workspace)
    builder_config.builder_optimization_level = config.optimization_level
    for name in precision.flags:
        flag = getattr(trt_module.BuilderFlag, name, None)
        if flag is None:
            raise BackendError(f"TensorRT {api.version} has no BuilderFlag.{name}; "
                               "this is a bug in the precision plan")
        builder_config.set_flag(flag)
    tf32 = getattr(trt_module.BuilderFlag, "TF32", None)
    if precision.clear_tf32 and tf32 is not None:
        # fp32 means fp32: TF32 rounds matmul inputs to 10 mantissa bits.
        builder_config.clear_flag(tf32)
    if config.hardware_compatible:
        builder_config.hardware_compatibility_level = (
            trt_module.HardwareCompatibilityLevel.AMPERE_PLUS)
    if config.version_compatible:
        builder_config.set_flag(trt_module.BuilderFlag.VERSION_COMPATIBLE)
        if config.exclude_lean_runtime:
            builder_config.set_flag(trt_module.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
    if config.detailed_profiling:
        builder_config.profiling_verbosity = trt_module.ProfilingVerbosity.DETAILED
    for profile_shapes_ in shapes:
        profile: trt.IOptimizationProfile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile_shapes_.items():
            profile.set_shape(name, trt_module.Dims(list(lo)), trt_module.Dims(list(opt)),
                              trt_module.Dims(list(hi)))
        if builder_config.add_optimization_profile(profile) < 0:
            raise BackendError(f"TensorRT rejected optimization profile {profile_shapes_}: "
                               f"{log.last_errors()}")
    return builder_config


def _metas(trt_module: Any, tensors: list[trt.ITensor]) -> tuple[TensorMeta, ...]:
    from workers.backends.tensorrt import numpy_dtype

    return tuple(TensorMeta(t.name, numpy_dtype(trt_module, t.dtype, t.name), _dims(t.shape))
                 for t in tensors)


def _set_timing_cache(config: trt.IBuilderConfig, data: bytes | None, log: Any) -> bool:
    """Start from the cached timings when they fit this TensorRT and GPU, else from empty.

    Returns whether the cached timings were loaded.
    """
    cache = None
    if data:
        try:
            cache = config.create_timing_cache(data)
        except Exception as exc:  # a corrupt or foreign cache: rebuild the timings
            log.warnings.append(f"timing cache ignored ({exc})")
            cache = None
        if cache is not None and not config.set_timing_cache(cache, False):
            log.warnings.append("timing cache ignored (built by another TensorRT or GPU)")
            cache = None
        elif cache is not None:
            return True
    config.set_timing_cache(config.create_timing_cache(b""), False)
    return False


def plan_nbytes_text(n: int) -> str:
    """`12.3 MiB`: sizes in messages."""
    if n < 1024:
        return f"{n} B"
    exponent = min(int(math.log(n, 1024)), 3)
    return f"{n / 1024 ** exponent:.1f} {['B', 'KiB', 'MiB', 'GiB'][exponent]}"
