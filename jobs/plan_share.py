"""Getting the right plan to every GPU actor: probe the GPU nodes, build or fetch, share by ref.

1. `probe_gpu_nodes` runs one small task on each GPU node: its compute capability, CUDA and
   TensorRT (full, lean, or none). The driver needs no GPU.
2. `plan_targets` groups the nodes: one plan per compute capability and GPU model (TensorRT
   supports a plan only on the device model that built it), or one `ampere_plus` plan for all
   when the plan is hardware-compatible. Nodes with only the lean or dispatch runtime join
   only targets whose plans they can run (version-compatible ones).
3. `share_plans`, per target: cache hit -> the driver reads the plan and `ray.put`s it once;
   miss -> exactly one Ray task on a GPU node of that target builds it and returns it, so the
   plan enters the object store as that task's result, once; the driver commits it to the
   cache (signing it with the plan key, which never leaves the driver), so GPU nodes need no
   access to the cache.
4. Actors (`PlanWorker`) receive every target's ObjectRef, find their own GPU's compute
   capability and model and fetch only their plan from the object store (no per-actor storage
   download).

Trust (see `jobs.plan_signing`): TensorRT host code is allowed only for plans this run built or
whose signature verifies with the job's plan key (`PlanRefs.host_code`). With a key, a cached
plan without a valid signature is not used; without one, a cached plan is used with host code
disallowed, unless it needs host code (version-compatible with the lean runtime or `--plugins`
libraries inside).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

import ray
from ray.exceptions import GetTimeoutError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from jobs.plan_cache import (
    CachedPlan,
    PlanCache,
    PlanKey,
    default_cache_uri,
    digest,
    read_external_data,
)
from jobs.plan_signing import PlanSigner, load_signer
from workers.actor import ShardWorker
from workers.backends import create_backend
from workers.errors import BackendError, RunnerError, SpecError
from workers.plan_build import (
    AMPERE_PLUS,
    BuildConfig,
    GpuFacts,
    external_data_locations,
    plan_precision,
    profile_shapes,
    target_key,
)
from workers.tensors import ModelInfo
from workers.types import Shard, ShardResult, WorkerConfig

PROBE_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class GpuNode:
    """A Ray node with GPUs, and what its probe found."""

    node_id: str
    address: str
    gpus: int
    facts: GpuFacts

    def describe(self) -> str:
        name = f" {self.facts.gpu_name}" if self.facts.gpu_name else ""
        return f"{self.address} ({self.gpus}x{name}, compute capability {self.facts.capability_text})"


def _probe_task() -> GpuFacts:
    from workers.plan_build import local_gpu_facts

    return local_gpu_facts(0)


def probe_gpu_nodes(timeout_s: float = PROBE_TIMEOUT_S) -> list[GpuNode]:
    """Probe one GPU of every alive GPU node (GPUs of one node are assumed to be one model)."""
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) > 0]
    remote = ray.remote(_probe_task)
    refs = [remote.options(num_gpus=1, num_cpus=0, max_retries=1,
                           scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                           ).remote() for n in nodes]
    try:
        facts = ray.get(refs, timeout=timeout_s)
    except GetTimeoutError as exc:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise SpecError(f"could not probe the GPU nodes within {timeout_s:.0f}s (are their GPUs "
                        "held by other jobs?); free a GPU on each node and rerun") from exc
    except RayTaskError as exc:
        raise BackendError(f"probing a GPU node failed: {_cause(exc)}") from exc
    return [GpuNode(node_id=n["NodeID"], address=n.get("NodeManagerAddress", n["NodeID"][:8]),
                    gpus=int(n["Resources"]["GPU"]), facts=f) for n, f in zip(nodes, facts,
                                                                              strict=True)]


def _cause(exc: RayTaskError) -> str:
    cause = exc.cause
    return str(cause) if isinstance(cause, RunnerError) else f"{cause.__class__.__name__}: {cause}"


def runtime_problem(facts: GpuFacts, build: BuildConfig) -> str | None:
    """Why a node with `facts` cannot run the plans `build` makes (None: it can).

    The lean runtime runs only version-compatible plans; the dispatch runtime only those that
    carry the lean runtime inside.
    """
    if not facts.tensorrt:
        return facts.problem or "no TensorRT"
    module = facts.tensorrt_module
    if module == "tensorrt_lean" and not build.version_compatible:
        return (f"only tensorrt_lean {facts.tensorrt}, which runs only version-compatible plans "
                "(--version-compatible)")
    if module == "tensorrt_dispatch" and (not build.version_compatible
                                          or build.exclude_lean_runtime):
        return (f"only tensorrt_dispatch {facts.tensorrt}, which runs only version-compatible "
                "plans that carry the lean runtime (--version-compatible without "
                "--exclude-lean-runtime)")
    return None


def choose_backend(requested: str, nodes: Sequence[GpuNode], build: BuildConfig | None = None
                   ) -> str:
    """`tensorrt` or `onnxruntime` for a cluster whose GPU nodes are `nodes` (none: CPU only).

    `auto` takes TensorRT when every GPU node can run the plans `build` makes (lean-only nodes
    run only version-compatible ones) and each plan target has a node that can build; a
    `tensorrt` request that cannot be met fails here, before any actor.
    """
    build = build or BuildConfig()
    if requested == "onnxruntime":
        return "onnxruntime"
    if not nodes:
        if requested == "tensorrt":
            raise SpecError("backend 'tensorrt' needs GPU nodes, and this Ray cluster has none; "
                            "add GPU workers or pass --backend onnxruntime")
        return "onnxruntime"
    problems = [(n, runtime_problem(n.facts, build)) for n in nodes]
    unable = [(n, why) for n, why in problems if why]
    if requested == "tensorrt":
        if unable:
            what = "; ".join(f"{n.describe()}: {why}" for n, why in unable[:3])
            raise SpecError(
                f"backend 'tensorrt' needs every GPU node to run this job's plans, and "
                f"{len(unable)} of {len(nodes)} cannot ({what}); pip install '.[tensorrt-cu12]' "
                "or '.[tensorrt-cu13]' on them (the lean runtime is enough for plans built "
                "--version-compatible), or pass --backend onnxruntime")
        return "tensorrt"
    groups: dict[str, list[GpuNode]] = {}
    for node in nodes:
        groups.setdefault(node_target(node, build), []).append(node)
    can_build = all(any(n.facts.can_build for n in group) for group in groups.values())
    return "tensorrt" if not unable and can_build else "onnxruntime"


def node_target(node: GpuNode, build: BuildConfig) -> str:
    """The plan target a node runs: its compute capability and GPU model, or `ampere_plus`."""
    return target_key(node.facts.capability, build.hardware_compatible, node.facts.gpu_name)


@dataclass(frozen=True)
class PlanTarget:
    """The nodes that run one plan, and the node that builds it (None: none can)."""

    key: str
    nodes: tuple[GpuNode, ...]
    builder: GpuNode | None

    @property
    def tensorrt(self) -> str:
        return (self.builder or self.nodes[0]).facts.tensorrt or "unknown"

    @property
    def cuda_major(self) -> int | None:
        return (self.builder or self.nodes[0]).facts.cuda_major


def plan_targets(nodes: Sequence[GpuNode], build: BuildConfig) -> list[PlanTarget]:
    """One target per compute capability and GPU model, or one `ampere_plus` target for a
    hardware-compatible plan.

    Within a target every node must run the same TensorRT version, unless the plan is
    version-compatible; then it is built with the oldest version present (newer runtimes
    load it), and with the lean runtime excluded, every node needs exactly that version.
    """
    groups: dict[str, list[GpuNode]] = {}
    for node in nodes:
        if build.hardware_compatible and node.facts.capability < (8, 0):
            raise SpecError(f"hardware-compatible plans run on Ampere or newer GPUs (compute "
                            f"capability 8.0+), and node {node.describe()} is older; drop "
                            "--hardware-compatible or remove the node")
        why = runtime_problem(node.facts, build)
        if why:
            raise SpecError(f"node {node.describe()} cannot run this job's plans ({why}); build "
                            "with --version-compatible, install the full tensorrt package "
                            "there, or pass --backend onnxruntime")
        groups.setdefault(node_target(node, build), []).append(node)
    targets = []
    for key, members in sorted(groups.items()):
        versions = sorted({n.facts.tensorrt or "none" for n in members}, key=_version_order)
        exact = not build.version_compatible or build.exclude_lean_runtime
        if len(versions) > 1 and exact:
            listing = ", ".join(f"{n.address}: {n.facts.tensorrt}" for n in members)
            fix = ("install one TensorRT version on all of them, or build with "
                   "--version-compatible (without --exclude-lean-runtime)")
            raise SpecError(f"the nodes for plan {key} run different TensorRT versions "
                            f"({listing}), and a plan loads only on the version that built it; {fix}")
        builders = [n for n in members if n.facts.can_build and n.facts.tensorrt == versions[0]]
        targets.append(PlanTarget(key=key, nodes=tuple(members),
                                  builder=builders[0] if builders else None))
    return targets


def _version_order(version: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("."))


# ---------------------------------------------------------------------------------------------
# Build tasks and the hand-off


def _build_task(model: bytes, external: dict[str, bytes], build: BuildConfig, key: PlanKey,
                timing_cache: bytes | None, source: str, storage_options: dict[str, Any]
                ) -> tuple[bytes, dict[str, Any]]:
    """On a GPU node: build the plan for `key`; return (plan, {info, timing_cache}).
    `storage_options` reach the `--plugins` libraries, which the build fetches.

    The driver commits what it returns (and reads the timing cache it starts from): the cache
    may be on the driver's own disk, and the plan key stays with the driver.
    """
    from workers.plan_build import build_plan

    result = build_plan(model, build, timing_cache=timing_cache, external_data=external,
                        source=source, storage_options=storage_options)
    built_for = target_key(result.capability, build.hardware_compatible, result.gpu_name)
    if result.tensorrt != key.tensorrt or built_for != key.target:
        raise BackendError(f"the build task ran on a node with TensorRT {result.tensorrt} and "
                           f"target {built_for}, but plan {key.target} with TensorRT "
                           f"{key.tensorrt} was asked for; the cluster changed during the job: "
                           "rerun it")
    return result.plan, {"info": {**result.info(), "warnings": result.warnings[-20:]},
                         "timing_cache": result.timing_cache}


def needs_host_code(build: BuildConfig) -> bool:
    """True when plans of `build` carry host code: version-compatible, with the lean runtime or
    `--plugins` libraries inside (`plugins_to_serialize`)."""
    return build.version_compatible and (not build.exclude_lean_runtime or bool(build.plugins))


def cached_plan_problem(hit: CachedPlan, signer: PlanSigner | None, build: BuildConfig
                        ) -> str | None:
    """Why a cached plan may not be used (None: it may; with host code only if verified).

    With a key, only a plan whose signature verifies; without one, any plan but one that needs
    host code, which only plans this run built or signed with the key may run.
    """
    if hit.unverified is None:
        return None
    if signer is not None:
        return hit.unverified
    if needs_host_code(build):
        return ("it is not signed (no plan key is set) and a version-compatible plan runs host "
                "code, which only plans this run built or signed with the plan key may")
    return None


@dataclass(frozen=True)
class PlanRefs:
    """Every target's plan in the object store; each actor takes the one for its GPU.

    `capability` and `gpu_name` fix the GPU every actor assumes (for tests, or a cluster known
    in advance); None: each actor asks its own GPU.
    """

    refs: tuple[tuple[str, Any], ...]
    capability: tuple[int, int] | None = None
    gpu_name: str | None = None
    #: Targets whose plan may run TensorRT host code: built by this run, or signed with the
    #: job's plan key (see jobs.plan_signing). Every other plan loads with it disallowed.
    host_code: tuple[str, ...] = ()

    @property
    def keys(self) -> list[str]:
        return [key for key, _ in self.refs]


def select_plan(keys: Sequence[str], capability: tuple[int, int], gpu_name: str = "") -> str:
    """The plan key for a GPU: its own compute capability and model, else `ampere_plus` if it
    fits; never a plan built on another GPU model of the same compute capability."""
    exact = target_key(capability, False, gpu_name)
    if exact in keys:
        return exact
    if AMPERE_PLUS in keys and capability >= (8, 0):
        return AMPERE_PLUS
    name = f" ({gpu_name})" if gpu_name else ""
    raise BackendError(f"this worker's GPU{name} has compute capability "
                       f"{capability[0]}.{capability[1]}, and the job's plans are for "
                       f"{sorted(keys)} (the node joined after the job probed the cluster?); "
                       "rerun the job so it builds a plan for this GPU, or build with "
                       "--hardware-compatible")


class PlanWorker(ShardWorker):
    """A ShardWorker that picks its plan by its GPU's compute capability, on first use.

    The pick happens in `load()`/`process()`, not the constructor, so a missing plan is a
    task error the driver reports, not an actor that fails to start.
    """

    def __init__(self, config: WorkerConfig, plans: PlanRefs) -> None:
        super().__init__(config, b"")
        self.plans = plans
        self.plan_key: str | None = None
        self.capability: tuple[int, int] | None = None

    def _ensure_plan(self) -> None:
        if self.plan_key is not None:
            return
        capability, name = self.plans.capability, self.plans.gpu_name
        if capability is None or name is None:
            from workers import cuda

            device = self.config.backend_config.device_id
            capability = capability or cuda.compute_capability(device)
            name = cuda.device_name(device) if name is None else name
        key = select_plan(self.plans.keys, capability, name)
        plan: bytes = ray.get(dict(self.plans.refs)[key])
        # The driver decided per plan whether it is trusted to run host code; never the spec.
        trusted = key in self.plans.host_code
        config = replace(self.config.backend_config, engine_host_code_allowed=trusted,
                         plugins_in_plan=self.config.backend_config.plugins_in_plan and trusted)
        self.backend = create_backend(self.config.backend, plan, config)
        self.plan_key, self.capability = key, capability

    def load(self) -> dict[str, Any]:
        self._ensure_plan()
        info = super().load()
        assert self.capability is not None
        info.update(plan=self.plan_key,
                    compute_capability=f"{self.capability[0]}.{self.capability[1]}",
                    host_code_allowed=self.backend.config.engine_host_code_allowed)
        return info

    def process(self, shard: Shard) -> ShardResult:
        with self._lock:  # calls may overlap on a GPU actor; pick and load the plan once
            self._ensure_plan()
        return super().process(shard)


@dataclass
class SharedPlans:
    """What `share_plans` did: the refs for the pool, and per target the manifest's record."""

    refs: PlanRefs
    plans: dict[str, dict[str, Any]] = field(default_factory=dict)


def share_plans(model_bytes: bytes, model: ModelInfo, model_uri: str, spec: Any,
                nodes: Sequence[GpuNode], stream: TextIO | None = None,
                build: BuildConfig | None = None) -> SharedPlans:
    """Find or build one plan per target and put each in the object store once.

    `build`: the build settings (default: the spec's, `spec.build_config()`); the `--plugins`
    libraries' hashes are put in it here, since they are in the plan key.
    """
    from workers.plugins import digest_plugins

    build = replace(build or spec.build_config(),
                    plugins=digest_plugins(spec.plugins, spec.storage))
    source = f"model '{model_uri}'"
    profile_shapes(model.inputs, build, source)  # shape problems fail before any GPU work
    signer = load_signer(getattr(spec, "plan_key_file", None))
    cache = PlanCache(spec.plan_cache or default_cache_uri(), spec.storage)
    locations = external_data_locations(model_bytes, source)
    external = read_external_data(model_uri, locations, spec.storage) if locations else {}
    external_digests = tuple((loc, digest(data)) for loc, data in sorted(external.items()))
    from workers.onnx_precision import converter_version, model_types

    types = model_types(model_bytes, source)
    refs: dict[str, Any] = {}
    host_code: set[str] = set()
    records: dict[str, dict[str, Any]] = {}
    pending: dict[str, tuple[Any, Any, float, PlanTarget, PlanKey]] = {}
    model_ref = None
    for target in plan_targets(nodes, build):
        facts = (target.builder or target.nodes[0]).facts
        # Precision problems (int8 without Q/DQ, fp8 on Ampere, ...) fail before building.
        decisions = [plan_precision(build.precision, facts.api, types, node.facts.capability,
                                    build.hardware_compatible, source) for node in target.nodes]
        # A plan built from a converted model is keyed by the converter too, so plans made
        # by a conversion that was since fixed are not reused.
        conversion = converter_version() if any(d.convert_to for d in decisions) else None
        key = PlanKey(model_sha256=digest(model_bytes), external_data=external_digests,
                      tensorrt=target.tensorrt, cuda_major=target.cuda_major, target=target.key,
                      build=build, conversion=conversion)
        hit = cache.lookup(key, signer)
        refused = cached_plan_problem(hit, signer, build) if hit is not None else None
        if hit is not None and refused is None:
            refs[target.key] = ray.put(hit.plan)
            verified = hit.unverified is None
            if verified and build.version_compatible:
                host_code.add(target.key)
            records[target.key] = {"fingerprint": key.fingerprint, "source": "cache",
                                   "url": hit.url, "bytes": len(hit.plan),
                                   "signature": "verified" if verified else
                                   "none (no plan key)",
                                   "nodes": [n.address for n in target.nodes]}
            trust = ("signature verified" if verified else
                     "not signed (no plan key): loaded with TensorRT host code disallowed")
            _say(stream, f"plan {target.key}: cached ({key.fingerprint[:12]}, "
                         f"{len(hit.plan):,} bytes, {trust})")
            continue
        if hit is not None:
            _say(stream, f"plan {target.key}: the cached plan {hit.url} is not used: {refused}")
        if target.builder is None:
            why = f"; the cached plan was not used: {refused}" if refused else ""
            raise SpecError(
                f"plan {target.key} is not in the cache ({cache.uri}) and no node for it can "
                f"build it (they have only {facts.tensorrt_module or 'no TensorRT'}){why}; install "
                "the full tensorrt package on one of them, or build it elsewhere with "
                "python -m jobs.plan build and point --plan-cache at its cache")
        if model_ref is None:
            model_ref = ray.put(model_bytes)
        task = ray.remote(_build_task).options(
            num_gpus=1, num_cpus=1, num_returns=2, max_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(target.builder.node_id, soft=False))
        # num_returns=2: the plan and its build facts are separate objects; the plan's ref goes
        # to the actors as it is, and the driver fetches the plan once to commit it.
        timing = cache.read_timing_cache(key.tensorrt, key.target)
        returned: Any = task.remote(model_ref, external, build, key, timing, source,
                                    dict(spec.storage))
        plan_ref, meta_ref = returned
        pending[target.key] = (plan_ref, meta_ref, time.monotonic(), target, key)
        _say(stream, f"plan {target.key}: building on {target.builder.describe()} "
                     f"({key.fingerprint[:12]})")
    for target_name, (plan_ref, meta_ref, started, built, key) in pending.items():
        try:
            meta: dict[str, Any] = ray.get(meta_ref)
            plan: bytes = ray.get(plan_ref)
        except RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, RunnerError):
                raise cause from exc
            raise BackendError(f"building plan {target_name} failed: {_cause(exc)}") from exc
        sidecar = cache.commit(key, plan, meta["info"], signer).sidecar
        if meta["timing_cache"]:
            cache.write_timing_cache(key.tensorrt, key.target, meta["timing_cache"])
        del plan  # the actors take the task's own object; the driver needed it to commit
        refs[target_name] = plan_ref
        if build.version_compatible:
            host_code.add(target_name)  # built by this run: its host code is the job's own
        records[target_name] = {"fingerprint": sidecar["fingerprint"], "source": "built",
                                "build_seconds": sidecar.get("build_seconds"),
                                "bytes": sidecar["plan"]["bytes"],
                                "precision_how": sidecar.get("precision_how"),
                                "signature": "signed" if signer else "none (no plan key)",
                                "nodes": [n.address for n in built.nodes]}
        _say(stream, f"plan {target_name}: built in {time.monotonic() - started:.1f}s "
                     f"({sidecar['plan']['bytes']:,} bytes, {sidecar.get('precision_how')}"
                     f"{', signed' if signer else ''})")
    return SharedPlans(refs=PlanRefs(tuple(sorted(refs.items())),
                                     host_code=tuple(sorted(host_code))), plans=records)


def _say(stream: TextIO | None, line: str) -> None:
    if stream is not None:
        print(line, file=stream, flush=True)
