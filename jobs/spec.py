"""The job spec: command-line flags and a YAML file merged into one validated, frozen value."""

from __future__ import annotations

import argparse
import copy
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from jobs.processing import (
    INPUT_FORMATS,
    add_processing_flags,
    apply_processing_flags,
    command_line_functions,
    function_items,
    parse_postprocess,
    parse_preprocess,
)
from workers.backends import BACKEND_NAMES
from workers.errors import SpecError
from workers.plan_build import DEFAULT_OPTIMIZATION_LEVEL, BuildConfig, parse_bytes
from workers.types import DEFAULT_MAX_ROW_GROUP_BYTES

PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8")
DEFAULT_BATCH_SIZE = 256
#: Rows per text batch on CPU engines unless --batch-size says otherwise. ONNX Runtime on CPUs
#: runs no faster per row in larger batches, while a larger batch spans more lengths and pads
#: more: all-MiniLM-L6-v2 on one core, reviews sorted by length, 187 rows/s in batches of 16,
#: 167 of 32, 148 of 64; a whole 250-row shard as one batch (256, the GPU default), 41.
CPU_TEXT_BATCH_SIZE = 16
#: Rows per text batch on GPUs unless --batch-size says otherwise. A MiniLM-sized encoder on
#: short rows is bound by the engine's launch on the host (ONNX Runtime's ~2.7 ms per batch of
#: 256 rows x ~33 tokens, about what the GPU computes for it): larger batches launch less per
#: row (bench/results/session26).
GPU_TEXT_BATCH_SIZE = 1024


def _freeze(value: Any) -> Any:
    """JSON-like value made hashable: dicts become sorted item tuples, lists tuples."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple) and all(isinstance(v, tuple) and len(v) == 2
                                        and isinstance(v[0], str) for v in value):
        return {k: _thaw(v) for k, v in value}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class JobSpec:
    """One job; `None` fields mean "the default", resolved by the driver."""

    model: str
    input: str
    output: str
    #: Caffe: the trained net.caffemodel for `model` (a deploy.prototxt); converted to ONNX in
    #: the driver (jobs/caffe.py). None: `model` is an ONNX model.
    weights: str | None = None
    columns: tuple[tuple[str, str], ...] = ()
    keep: tuple[str, ...] = ()
    #: Rows per batch; None: `batch_rows` picks (256, or 16 for text on CPU engines).
    batch_size: int | None = None
    workers: int | None = None
    #: None: shards balanced over the workers (`jobs.shards.balanced_rows`).
    rows_per_shard: int | None = None
    backend: str = "auto"
    storage_options: tuple[tuple[str, Any], ...] = ()
    max_failed_shards: int = 0
    max_retries: int = 2
    overwrite: bool = False
    max_actor_deaths: int = 3
    lock_timeout: float = 120.0
    takeover: bool = False
    precision: str = "fp32"
    #: None: 1 on a CPU-only cluster; on GPUs, the CPUs a GPU node has per GPU (the host side
    #: of a GPU actor, tokenizing and decoding, gets all of them).
    cpus_per_worker: int | None = None
    #: Shards queued per actor; None: 2, or on GPU actors up to 4 when shards are a few
    #: batches long (`jobs.driver.default_shards_in_flight`).
    shards_in_flight: int | None = None
    #: GPU actors: batches in flight (each with its own stream and buffers), row-group readers
    #: (None: the worker's CPUs).
    slots: int = 3
    readers: int | None = None
    #: GPU actors: of the `slots` batches in flight, how many execute at once.
    concurrent_batches: int = 2
    plan_cache: str | None = None
    #: A file holding the key that signs and verifies cached plans (jobs.plan_signing); the
    #: key itself is never part of the spec.
    plan_key_file: str | None = None
    progress: bool | None = None
    workspace: int | None = None
    optimization_level: int | None = None
    hardware_compatible: bool = False
    version_compatible: bool = False
    exclude_lean_runtime: bool = False
    #: `--plugins`: TensorRT plugin libraries / ONNX Runtime custom-op libraries (local paths on
    #: every node, or fsspec URIs), loaded by the build task and every actor
    plugins: tuple[str, ...] = ()
    #: Preprocessors (workers.preprocess specs) and postprocessors (workers.postprocess specs);
    #: a config's lists of items are parsed into them by `spec_from_settings`.
    preprocess: tuple[Any, ...] = ()
    postprocess: tuple[Any, ...] = ()
    input_format: str = "auto"
    preprocess_threads: int | None = None
    #: Which files of a directory or glob input are read (Ray Data's `file_extensions`):
    #: names ending in `.EXT` for any EXT, case-insensitive; `*` reads every file.
    file_extensions: tuple[str, ...] = ("parquet",)
    #: What one row group may decode to in memory (bytes, or a size such as "2GiB").
    max_row_group_bytes: int = DEFAULT_MAX_ROW_GROUP_BYTES
    #: Text: most padded tokens per batch, and rows sorted by length together (None: defaults
    #: in `workers.batching`).
    max_batch_tokens: int | None = None
    sort_window: int | None = None

    def __post_init__(self) -> None:
        for name in ("model", "input", "output"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise SpecError(f"{name} is required; pass --{name} URI or set {name}: in the config")
        _check_caffe(self.model, self.weights)
        for name in ("slots", "concurrent_batches"):
            _positive(name, getattr(self, name))
        for name in ("batch_size", "workers", "rows_per_shard", "cpus_per_worker", "readers",
                     "shards_in_flight", "max_batch_tokens", "sort_window"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        for name in ("max_failed_shards", "max_retries"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SpecError(f"{name} must be an integer >= 0, got {value!r}")
        _check_fault_options(self)
        if self.backend not in BACKEND_NAMES:
            raise SpecError(f"backend must be one of {', '.join(BACKEND_NAMES)}, "
                            f"got {self.backend!r}")
        if self.precision not in PRECISIONS:
            raise SpecError(f"precision must be one of {', '.join(PRECISIONS)}, "
                            f"got {self.precision!r}")
        _check_build_options(self)
        if self.input_format not in INPUT_FORMATS:
            raise SpecError(f"input_format must be one of {', '.join(INPUT_FORMATS)}, "
                            f"got {self.input_format!r}")
        if self.preprocess_threads is not None:
            _positive("preprocess_threads", self.preprocess_threads)
        object.__setattr__(self, "file_extensions", _extensions(self.file_extensions))
        object.__setattr__(self, "max_row_group_bytes",
                           parse_bytes(self.max_row_group_bytes, "max_row_group_bytes"))
        object.__setattr__(self, "preprocess", parse_preprocess(self.preprocess))
        object.__setattr__(self, "postprocess", parse_postprocess(self.postprocess))
        inputs = [name for name, _ in self.columns]
        duplicated = sorted({n for n in inputs if inputs.count(n) > 1})
        if duplicated:
            raise SpecError(f"model input(s) {duplicated} are mapped more than once in columns; "
                            "map each input to one column")

    @property
    def column_map(self) -> dict[str, str]:
        return dict(self.columns)

    @property
    def storage(self) -> dict[str, Any]:
        return _thaw(self.storage_options) if self.storage_options else {}

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "columns":
                value = dict(value)
            elif f.name in ("preprocess", "postprocess"):
                value = [item.to_json() for item in value]
            elif f.name == "storage_options":
                value = sorted(self.storage)  # keys only: values may be credentials
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


    def batch_rows(self, gpus: bool, text: bool) -> int:
        """Rows per batch: `batch_size`, else the default for where the job runs and what."""
        if self.batch_size is not None:
            return self.batch_size
        if text:
            return GPU_TEXT_BATCH_SIZE if gpus else CPU_TEXT_BATCH_SIZE
        return DEFAULT_BATCH_SIZE

    def build_config(self, text: tuple[tuple[tuple[int, int, int], ...],
                                       tuple[tuple[int, int, int], ...]] | None = None,
                     plugins: tuple[tuple[str, str], ...] = ()) -> BuildConfig:
        """The TensorRT build this job asks for: one profile from 1 row to the batch size, or,
        for text (`text`: batch and width profiles, `jobs.text_profiles`), one per range of
        widths.

        `plugins`: the (uri, sha256) of `self.plugins` (`workers.plugins.digest_plugins`), which
        the fingerprint holds; the driver reads the libraries once to compute them.
        """
        if text is not None:
            return BuildConfig(
                profiles=text[0], lengths=text[1], precision=self.precision,
                workspace=self.workspace,
                optimization_level=(DEFAULT_OPTIMIZATION_LEVEL if self.optimization_level is None
                                    else self.optimization_level),
                hardware_compatible=self.hardware_compatible,
                version_compatible=self.version_compatible,
                exclude_lean_runtime=self.exclude_lean_runtime, plugins=plugins)
        return BuildConfig.for_batch(
            self.batch_size or DEFAULT_BATCH_SIZE, precision=self.precision, workspace=self.workspace,
            optimization_level=(DEFAULT_OPTIMIZATION_LEVEL if self.optimization_level is None
                                else self.optimization_level),
            hardware_compatible=self.hardware_compatible,
            version_compatible=self.version_compatible,
            exclude_lean_runtime=self.exclude_lean_runtime, plugins=plugins)


def _check_caffe(model: str, weights: str | None) -> None:
    """A Caffe model is a deploy.prototxt with its weights; one without the other is refused."""
    if weights is not None and (not isinstance(weights, str) or not weights):
        raise SpecError(f"weights must be the URI of a Caffe net.caffemodel, got {weights!r}")
    if weights is None and model.lower().endswith(".prototxt"):
        raise SpecError(f"model '{model}' is a Caffe deploy.prototxt, which holds no weights; "
                        "pass its trained net.caffemodel with --weights URI (weights: in the "
                        "config)")
    if weights is not None and model.lower().endswith(".onnx"):
        raise SpecError(f"weights '{weights}' are for a Caffe model, and model '{model}' is an "
                        "ONNX model, which holds its own; drop --weights, or pass the Caffe "
                        "deploy.prototxt as --model")


def _extensions(value: Any) -> tuple[str, ...]:
    """`.Parquet, pq` or `["parquet", "pq"]` -> ("parquet", "pq"): lower case, no dots."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
        raise SpecError(f"file_extensions must be a list of extensions such as [parquet, pq], "
                        f"got {value!r}")
    names = tuple(dict.fromkeys(v.strip().lstrip(".").lower() for v in items if v.strip()))
    if not names or not all(names):
        raise SpecError("file_extensions must name at least one extension (such as parquet,pq, "
                        f"or '*' for every file), got {list(names)}")
    return names


def _check_build_options(spec: JobSpec) -> None:
    """TensorRT build settings: sizes parsed (`4GiB`), flags boolean, BuildConfig's rules held."""
    if isinstance(spec.workspace, str):
        object.__setattr__(spec, "workspace", parse_bytes(spec.workspace, "workspace"))
    for name in ("hardware_compatible", "version_compatible", "exclude_lean_runtime"):
        if not isinstance(getattr(spec, name), bool):
            raise SpecError(f"{name} must be true or false, got {getattr(spec, name)!r}")
    spec.build_config()


def _check_fault_options(spec: JobSpec) -> None:
    """How the job meets dying workers and other jobs: see docs/failure-semantics.md."""
    _positive("max_actor_deaths", spec.max_actor_deaths)
    timeout = spec.lock_timeout
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not timeout > 0 \
            or timeout == float("inf"):
        raise SpecError(f"lock_timeout must be a number of seconds > 0, got {timeout!r}; "
                        "it is how long a job's lock on OUTPUT outlives its last heartbeat")
    object.__setattr__(spec, "lock_timeout", float(timeout))
    for name in ("takeover", "overwrite"):
        if not isinstance(getattr(spec, name), bool):
            raise SpecError(f"{name} must be true or false, got {getattr(spec, name)!r}")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SpecError(f"{name} must be an integer >= 1, got {value!r}")


def build_parser(prog: str = "python -m jobs.run", description: str | None = None
                 ) -> argparse.ArgumentParser:
    """The flags every entrypoint shares; defaults are None so the YAML file can fill them."""
    p = argparse.ArgumentParser(prog=prog, description=description or (
        "Run an ONNX model over a Parquet dataset on a Ray cluster; write Parquet parts."))
    p.add_argument("--config", metavar="job.yaml", help="YAML file with the same settings; "
                   "flags override it")
    p.add_argument("--model", metavar="URI", help="ONNX model, or a Caffe deploy.prototxt with "
                   "--weights (any fsspec URI)")
    p.add_argument("--weights", metavar="URI", help="Caffe: the trained net.caffemodel of "
                   "--model deploy.prototxt; the pair is converted to ONNX once, in the driver")
    p.add_argument("--input", metavar="URI", help="a Parquet file, a directory, or a glob")
    p.add_argument("--output", metavar="URI", help="directory that will hold the parts")
    p.add_argument("--column", action="append", metavar="INPUT=COLUMN", dest="columns",
                   help="feed model input INPUT from column COLUMN (repeatable); unmapped "
                   "inputs read the column of the same name")
    p.add_argument("--keep", action="append", metavar="COLUMN",
                   help="copy COLUMN into the output unchanged (repeatable)")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help=f"rows per batch (default {DEFAULT_BATCH_SIZE}; text {GPU_TEXT_BATCH_SIZE} "
                   f"on GPUs, {CPU_TEXT_BATCH_SIZE} on CPU engines); text batches are also cut "
                   "to --max-batch-tokens")
    p.add_argument("--workers", type=int, metavar="N",
                   help="actors (default: one per GPU, or one per CPU on a CPU-only cluster)")
    p.add_argument("--rows-per-shard", type=int, metavar="N",
                   help="target rows per shard; shards are whole row groups (default: at least "
                   "4 shards per worker, at most 100000 rows each)")
    p.add_argument("--backend", choices=BACKEND_NAMES)
    p.add_argument("--precision", choices=PRECISIONS,
                   help="numeric precision on TensorRT and ONNX Runtime's CUDA provider "
                   "(default fp32; fp16/bf16 convert the model, int8/fp8 need its Q/DQ nodes)")
    p.add_argument("--file-extensions", metavar="EXT,...",
                   help="files of a directory or glob --input that are read, by extension "
                   "(default parquet; e.g. parquet,pq; '*' for every file); others are skipped "
                   "and counted")
    p.add_argument("--storage-options", metavar="JSON|@FILE",
                   help="fsspec storage options as a JSON object, or @FILE to read them from a "
                   "file (keeps credentials out of the command line, which `ray job list` "
                   "shows); AWS_* variables also apply")
    p.add_argument("--storage-options-file", metavar="FILE",
                   help=f"a JSON file of fsspec storage options (also ${STORAGE_OPTIONS_FILE_ENV}"
                   f", or the JSON itself in ${STORAGE_OPTIONS_ENV}); --storage-options wins "
                   "key by key")
    p.add_argument("--max-failed-shards", type=int, metavar="N",
                   help="exit 0 even if up to N shards fail (default 0)")
    p.add_argument("--max-retries", type=int, metavar="N",
                   help="retries of a shard whose task failed in a way that may pass (a crash "
                   "in the backend, storage still failing after its own retries); bad data, "
                   "a bad spec and permanent storage errors (missing, denied) are not retried "
                   "(default 2)")
    p.add_argument("--cpus-per-worker", type=int, metavar="N",
                   help="CPUs each actor reserves in Ray and uses: its decoding/tokenizing "
                   "threads and ONNX Runtime's (default: on GPU clusters the node's CPUs per "
                   "GPU, else 1)")
    p.add_argument("--max-batch-tokens", type=int, metavar="N",
                   help="text: most tokens a batch holds, counted as rows x its longest row "
                   "(default 64 per row of --batch-size)")
    p.add_argument("--sort-window", type=int, metavar="ROWS",
                   help="text: rows sorted by length together before batching (default "
                   "max(8192, 16 x --batch-size))")
    p.add_argument("--shards-in-flight", type=int, metavar="N",
                   help="shards queued per actor (default 2; on GPU actors up to 4 when shards "
                   "are only a few batches long, so the next shard is read before the GPU needs it)")
    p.add_argument("--slots", type=int, metavar="K",
                   help="GPU actors: batches in flight, each with its own CUDA stream and "
                   "buffers (default 3: two executing, one being filled)")
    p.add_argument("--concurrent-batches", type=int, metavar="N",
                   help="GPU actors: of the K batches in flight, how many execute at once "
                   "(default 2, the rest wait with their inputs copied in; raise it for small "
                   "models whose batch leaves the GPU idle)")
    p.add_argument("--max-row-group-bytes", metavar="BYTES",
                   help="what one row group may decode to in memory, e.g. 2GiB (default 512MiB); "
                   "a larger one fails its shard before it is read")
    p.add_argument("--readers", type=int, metavar="N",
                   help="GPU actors: threads decoding Parquet row groups (default: the actor's "
                   "CPUs, --cpus-per-worker)")
    p.add_argument("--plan-cache", metavar="URI", help="where TensorRT plans are cached "
                   "(default ~/.cache/trt-batch-runner/plans on the driver's machine, private "
                   "to you)")
    p.add_argument("--plan-key-file", metavar="FILE",
                   help="a file holding the key that signs the plans this job builds and "
                   "verifies cached ones (also $TRT_BATCH_RUNNER_PLAN_KEY_FILE, or the key in "
                   "$TRT_BATCH_RUNNER_PLAN_KEY); with a key, an unsigned cached plan is rebuilt")
    p.add_argument("--workspace", metavar="BYTES", help="TensorRT builder workspace limit, "
                   "e.g. 4GiB (default: TensorRT's, the GPU's memory)")
    p.add_argument("--optimization-level", type=int, metavar="0-5", help="TensorRT builder "
                   "optimization level (default 3; higher builds longer, may run faster)")
    p.add_argument("--hardware-compatible", action="store_true", default=None,
                   help="one TensorRT plan for every Ampere-or-newer GPU (AMPERE_PLUS) instead "
                   "of one per compute capability")
    p.add_argument("--version-compatible", action="store_true", default=None,
                   help="TensorRT plans that later TensorRT versions and tensorrt-lean can run")
    p.add_argument("--exclude-lean-runtime", action="store_true", default=None,
                   help="with --version-compatible: keep the lean runtime out of the plan "
                   "(workers need tensorrt-lean of the building version)")
    p.add_argument("--plugins", action="append", metavar="LIB",
                   help="a TensorRT plugin library (or, with ONNX Runtime, a custom-op library) "
                   "to load before the model, in the build task and every actor: a local path "
                   "on every node or any fsspec URI (repeatable)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace another job's parts in OUTPUT")
    p.add_argument("--max-actor-deaths", type=int, metavar="N",
                   help="give up a shard after its workers died N times on it (default 3)")
    p.add_argument("--lock-timeout", type=float, metavar="SECONDS",
                   help="a job's lock on OUTPUT goes stale this long after its last heartbeat, "
                   "so a rerun can take over from a dead job (default 120)")
    p.add_argument("--takeover", action="store_true", default=None,
                   help="take OUTPUT's lock even if its job looks alive (only when you know it "
                   "is not running)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="live progress bar (default: when stderr is a terminal)")
    p.add_argument("--allow-user-code", action="store_true",
                   help="let the --config file name preprocess/postprocess functions "
                   "(module:function), which run in the driver and on every worker; functions "
                   "named on the command line need no flag")
    add_processing_flags(p)
    return p


#: Storage options from the environment (the JSON itself, or a file of it): the lowest layer,
#: under a file named in the config or on the command line, under inline options.
STORAGE_OPTIONS_ENV = "TRT_BATCH_RUNNER_STORAGE_OPTIONS"
STORAGE_OPTIONS_FILE_ENV = "TRT_BATCH_RUNNER_STORAGE_OPTIONS_FILE"
MAX_STORAGE_OPTIONS_BYTES = 1024 * 1024
# Settings that are not fields of the spec: resolved into fields by spec_from_settings.
_SETTINGS_ONLY = {"storage_options_file"}
_FIELDS = {f.name for f in fields(JobSpec)} | _SETTINGS_ONLY


def _parse_columns(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, column = item.partition("=")
        if not sep or not name or not column:
            raise SpecError(f"--column {item!r} is not INPUT=COLUMN; for example --column x=pixels")
        out[name] = column
    return out


#: A job config is a page of settings: these bounds refuse files that would cost more than
#: one to read (an alias bomb expands a few hundred bytes into millions of values).
MAX_CONFIG_BYTES = 1024 * 1024
MAX_CONFIG_VALUES = 100_000
MAX_CONFIG_DEPTH = 64


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    from workers.storage import read_bytes

    try:
        text = read_bytes(path)
    except OSError as exc:
        raise SpecError(f"cannot read config '{path}': {exc}") from exc
    if len(text) > MAX_CONFIG_BYTES:
        raise SpecError(f"config '{path}' is {len(text):,} bytes; a job config is at most "
                        f"{MAX_CONFIG_BYTES:,} bytes")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.MarkedYAMLError as exc:
        # PyYAML's own message quotes the offending line, which may hold credentials
        # (storage_options): say where and what, never the text. `from None` keeps the
        # original (with its quote) out of tracebacks too.
        raise SpecError(f"config '{path}' is not valid YAML: {_yaml_problem(exc)}; fix the "
                        "syntax there") from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise SpecError(f"config '{path}' is not valid YAML ({exc.__class__.__name__}); check "
                        "its syntax") from None
    if not isinstance(data, dict):
        raise SpecError(f"config '{path}' must be a mapping of settings, got {type(data).__name__}")
    _check_expansion(data, f"config '{path}'")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise SpecError(f"config '{path}' has unknown setting(s) {unknown}; "
                        f"known settings are {sorted(_FIELDS)}")
    return data


def _yaml_problem(exc: Any) -> str:
    """Where and what a YAML syntax error is, without the quoted source line."""
    mark = exc.problem_mark or exc.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = "; ".join(str(p) for p in (exc.context, exc.problem) if p)
    return f"{where}{what or 'syntax error'}"


def _check_expansion(data: Any, source: str) -> None:
    """Refuse settings that YAML aliases (`*name`) expand past MAX_CONFIG_VALUES, or loop.

    PyYAML builds an alias as a reference to the anchored value, so loading is cheap; whatever
    walks the settings afterwards (freezing them into the spec, writing the manifest) pays for
    every expanded copy. Counted with a memo per shared value, in time linear in the file.
    """
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(value: Any, where: str, depth: int) -> int:
        if not isinstance(value, dict | list):
            return 1
        key = id(value)
        if key in open_:
            raise SpecError(f"{source} refers to itself through a YAML alias ({where}); "
                            "settings cannot contain themselves: remove the alias")
        if key in sizes:
            return sizes[key]
        if depth > MAX_CONFIG_DEPTH:
            raise SpecError(f"{source} nests deeper than {MAX_CONFIG_DEPTH} levels at {where}; "
                            "a job's settings need far fewer")
        open_.add(key)
        total = 1
        children = (((f"{where}.{k}" if where else str(k)), v) for k, v in value.items()) \
            if isinstance(value, dict) else ((f"{where}[{i}]", v) for i, v in enumerate(value))
        for child_where, child in children:
            total += size(child, child_where, depth + 1)
            if total > MAX_CONFIG_VALUES:
                raise SpecError(f"{source} expands to more than {MAX_CONFIG_VALUES:,} values "
                                "through YAML aliases (*name); a job's settings need far fewer: "
                                "write the values out, or remove the aliases")
        open_.discard(key)
        sizes[key] = total
        return total

    size(data, "", 0)


def spec_from_settings(settings: Mapping[str, Any], source: str = "settings") -> JobSpec:
    """Build a JobSpec from a dict of settings (YAML shape), with type errors named."""
    data = dict(settings)
    columns = data.pop("columns", None) or {}
    if not isinstance(columns, Mapping):
        raise SpecError(f"columns in {source} must be a mapping of model input to column, "
                        f"got {type(columns).__name__}")
    keep = data.pop("keep", None) or []
    if isinstance(keep, str) or not isinstance(keep, Sequence):
        raise SpecError(f"keep in {source} must be a list of column names, got {keep!r}")
    plugins = data.pop("plugins", None) or []
    if isinstance(plugins, str) or not isinstance(plugins, Sequence):
        raise SpecError(f"plugins in {source} must be a list of library paths or URIs, "
                        f"got {plugins!r}")
    data["plugins"] = tuple(str(p) for p in plugins)
    storage = _storage_options(data.pop("storage_options", None),
                               data.pop("storage_options_file", None))
    for name in ("model", "input", "output"):
        data.setdefault(name, "")
    data["preprocess"] = parse_preprocess(data.get("preprocess"), source)
    data["postprocess"] = parse_postprocess(data.get("postprocess"), source)
    try:
        return JobSpec(columns=tuple((str(k), str(v)) for k, v in columns.items()),
                       keep=tuple(str(k) for k in keep),
                       storage_options=_freeze(storage), **data)
    except TypeError as exc:
        raise SpecError(f"bad setting in {source}: {exc}") from exc


def _storage_options(inline: Any, path: Any) -> dict[str, Any]:
    """Storage options, layered: the environment's, then a file's, then inline ones (JSON, or
    `@FILE`), each replacing the keys of the one before. Errors name the source, never the
    values (they are credentials)."""
    layers: list[dict[str, Any]] = []
    if os.environ.get(STORAGE_OPTIONS_ENV):
        layers.append(_options_json(os.environ[STORAGE_OPTIONS_ENV],
                                    f"${STORAGE_OPTIONS_ENV}"))
    if os.environ.get(STORAGE_OPTIONS_FILE_ENV):
        layers.append(_options_file(os.environ[STORAGE_OPTIONS_FILE_ENV]))
    if path:
        if not isinstance(path, str):
            raise SpecError(f"storage_options_file must be a path, got {type(path).__name__}")
        layers.append(_options_file(path))
    if isinstance(inline, str) and inline.startswith("@"):
        layers.append(_options_file(inline[1:]))
    elif isinstance(inline, str):
        layers.append(_options_json(inline, "storage_options"))
    elif inline:
        if not isinstance(inline, Mapping):
            raise SpecError(f"storage_options must be a JSON object, got {type(inline).__name__}")
        layers.append(dict(inline))
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer)
    return merged


def _options_json(text: str, source: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        # JSONDecodeError's message says where, and quotes nothing.
        raise SpecError(f"{source} is not valid JSON ({exc}); pass an object such as "
                        """'{"anon": true}'""") from None
    if not isinstance(value, dict):
        raise SpecError(f"{source} must be a JSON object, got {type(value).__name__}")
    return value


def _options_file(path: str) -> dict[str, Any]:
    """Storage options from a local JSON file (keep it readable by you alone: chmod 600)."""
    source = f"storage options file '{path}'"
    try:
        with open(os.path.expanduser(path), "rb") as f:
            data = f.read(MAX_STORAGE_OPTIONS_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"cannot read {source} ({exc.__class__.__name__}); check the path (on a "
                        "cluster: an absolute path on the node the driver runs on)") from None
    if len(data) > MAX_STORAGE_OPTIONS_BYTES:
        raise SpecError(f"{source} is over {MAX_STORAGE_OPTIONS_BYTES:,} bytes; storage options "
                        "are a few settings")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise SpecError(f"{source} is not UTF-8 text") from None
    return _options_json(text, source)


def spec_from_args(argv: Sequence[str] | None = None,
                   parser: argparse.ArgumentParser | None = None,
                   extra: Mapping[str, Any] | None = None) -> JobSpec:
    """Parse flags (and the YAML file they name) into a JobSpec; flags override the file."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    # A preset (jobs.score, jobs.enrich, jobs.relabel) puts its defaults under the config's.
    settings: dict[str, Any] = copy.deepcopy(dict(getattr(args, "preset", None) or {}))
    from_file = _load_yaml(args.config) if args.config else {}
    settings.update(from_file)
    settings.update(extra or {})
    flags = {k: v for k, v in vars(args).items() if k in _FIELDS and v is not None}
    if "columns" in flags:
        merged = dict(settings.get("columns") or {})
        merged.update(_parse_columns(flags.pop("columns")))
        settings["columns"] = merged
    settings.update(flags)
    source = f"config '{args.config}'" if args.config else "flags"
    apply_processing_flags(settings, args, source)
    if from_file and not getattr(args, "allow_user_code", False):
        _refuse_config_code(from_file, settings, args, source)
    return spec_from_settings(settings, source=source)


def _refuse_config_code(from_file: Mapping[str, Any], settings: Mapping[str, Any],
                        args: argparse.Namespace, source: str) -> None:
    """SpecError when the config file names user functions the job would run.

    Runs before anything is imported: a config may come from elsewhere, and importing a module
    runs its code. Functions the command line names are the user's own choice; a config's
    function that a flag replaced (--postprocess raw) is not run, so it is not refused.
    """
    named = command_line_functions(args)
    used = {target for section in ("preprocess", "postprocess")
            for _, target in function_items(settings.get(section), section, source)}
    found = [(section, where, target) for section in ("preprocess", "postprocess")
             for where, target in function_items(from_file.get(section), section, source)
             if target in used and target not in named]
    if found:
        what = "; ".join(f"{where}: {target}" for _, where, target in found)
        fix = " ".join(f"--{section} {target}" for section, _, target in found)
        raise SpecError(f"{source} names user code ({what}), which the runner would import and "
                        "run in the driver and on every worker; pass --allow-user-code if you "
                        f"trust this config, or name the function on the command line ({fix})")
