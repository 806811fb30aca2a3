"""Plan sharing: backend choice, one plan per compute capability, the object-store hand-off.

The GPU facts of nodes are given (`GpuFacts` values, as the probe would report them); the plans
handed off are real ONNX models run by ONNX Runtime actors, so each actor's output shows which
plan it fetched. No TensorRT result is imitated.
"""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path

import pytest
import ray

from jobs.driver import prepare, resolve_backend
from jobs.plan_cache import PlanCache, PlanKey, default_cache_uri, digest
from jobs.plan_share import (
    GpuNode,
    PlanRefs,
    choose_backend,
    plan_targets,
    select_plan,
    share_plans,
)
from jobs.pool import PoolConfig, ShardPool
from jobs.spec import JobSpec
from tests.models import two_input_model
from tests.test_job import check_exact, read_input, read_output
from workers.backends import BackendConfig
from workers.errors import BackendError, SpecError
from workers.plan_build import BuildConfig, GpuFacts
from workers.types import WorkerConfig


def node(name: str, capability: tuple[int, int], tensorrt: str | None = "10.13.0.35",
         can_build: bool = True, module: str | None = "tensorrt", gpu: str | None = None) -> GpuNode:
    facts = GpuFacts(capability=capability, gpu_name=gpu or f"GPU-{capability[0]}{capability[1]}",
                     tensorrt=tensorrt, tensorrt_module=module if tensorrt else None,
                     can_build=can_build and tensorrt is not None,
                     precision_flags=bool(tensorrt and tensorrt.startswith("10")), cuda_major=12,
                     problem=None if tensorrt else "TensorRT is not installed")
    return GpuNode(node_id=f"id-{name}", address=name, gpus=2, facts=facts)


# Selection -----------------------------------------------------------------------------------
A10, A40, H100 = "sm_86-nvidia-a10", "sm_86-nvidia-a40", "sm_90-nvidia-h100-80gb-hbm3"


def test_select_plan() -> None:
    keys = [A10, H100]
    assert select_plan(keys, (8, 6), "NVIDIA A10") == A10
    assert select_plan(keys, (9, 0), "NVIDIA H100 80GB HBM3") == H100
    assert select_plan(["ampere_plus"], (9, 0), "NVIDIA H200") == "ampere_plus"
    assert select_plan(["ampere_plus", H100], (9, 0), "NVIDIA H100 80GB HBM3") == H100
    with pytest.raises(BackendError, match=re.escape(
            "this worker's GPU (NVIDIA L4) has compute capability 8.9, and the job's plans are "
            f"for {sorted(keys)} (the node joined after the job probed the cluster?); rerun the "
            "job so it builds a plan for this GPU, or build with --hardware-compatible")):
        select_plan(keys, (8, 9), "NVIDIA L4")
    with pytest.raises(BackendError, match=r"compute capability 7\.5"):
        select_plan(["ampere_plus"], (7, 5))


def test_a_plan_of_another_gpu_model_is_not_taken() -> None:
    """An A40 shares the A10's compute capability (8.6), not its plan."""
    with pytest.raises(BackendError, match=re.escape("this worker's GPU (NVIDIA A40) has compute "
                                                     "capability 8.6")):
        select_plan([A10], (8, 6), "NVIDIA A40")
    assert select_plan([A10, A40], (8, 6), "NVIDIA A40") == A40


# Targets -------------------------------------------------------------------------------------
def test_one_target_per_compute_capability_and_gpu_model() -> None:
    nodes = [node("a", (8, 6), gpu="NVIDIA A10"), node("b", (9, 0), gpu="NVIDIA H100 80GB HBM3"),
             node("c", (8, 6), gpu="NVIDIA A10"), node("d", (8, 6), gpu="NVIDIA A40")]
    targets = plan_targets(nodes, BuildConfig())
    assert [(t.key, [n.address for n in t.nodes]) for t in targets] == [
        (A10, ["a", "c"]), (A40, ["d"]), (H100, ["b"])]
    assert [t.builder.address if t.builder else None for t in targets] == ["a", "d", "b"]


def test_lean_only_nodes_join_only_version_compatible_targets() -> None:
    lean = node("c", (8, 6), can_build=False, module="tensorrt_lean", gpu="NVIDIA A10")
    nodes = [node("a", (8, 6), gpu="NVIDIA A10"), lean]
    with pytest.raises(SpecError, match=re.escape(
            "node c (2x NVIDIA A10, compute capability 8.6) cannot run this job's plans (only "
            "tensorrt_lean 10.13.0.35, which runs only version-compatible plans "
            "(--version-compatible)); build with --version-compatible")):
        plan_targets(nodes, BuildConfig())
    target, = plan_targets(nodes, BuildConfig(version_compatible=True))
    assert [n.address for n in target.nodes] == ["a", "c"] and target.builder is not None
    dispatch = node("e", (8, 6), can_build=False, module="tensorrt_dispatch", gpu="NVIDIA A10")
    with pytest.raises(SpecError, match="carry the lean runtime"):
        plan_targets([nodes[0], dispatch], BuildConfig(version_compatible=True,
                                                       exclude_lean_runtime=True))


def test_hardware_compatible_is_one_target() -> None:
    targets = plan_targets([node("a", (8, 6)), node("b", (9, 0)), node("c", (8, 6), gpu="A40")],
                           BuildConfig(hardware_compatible=True))
    assert [(t.key, len(t.nodes)) for t in targets] == [("ampere_plus", 3)]
    with pytest.raises(SpecError, match=re.escape(
            "hardware-compatible plans run on Ampere or newer GPUs (compute capability 8.0+), and "
            "node t (2x GPU-75, compute capability 7.5) is older; drop --hardware-compatible")):
        plan_targets([node("a", (8, 6)), node("t", (7, 5))], BuildConfig(hardware_compatible=True))


def test_mixed_tensorrt_versions() -> None:
    nodes = [node("a", (9, 0), "10.13.0.35"), node("b", (9, 0), "10.9.0.34")]
    with pytest.raises(SpecError, match=re.escape(
            "the nodes for plan sm_90-gpu-90 run different TensorRT versions (a: 10.13.0.35, b: "
            "10.9.0.34), and a plan loads only on the version that built it; install one TensorRT "
            "version on all of them, or build with --version-compatible")):
        plan_targets(nodes, BuildConfig())
    # Version-compatible: built by the oldest version, which the newer runtime loads.
    target, = plan_targets(nodes, BuildConfig(version_compatible=True))
    assert target.builder is not None and target.builder.address == "b"
    assert target.tensorrt == "10.9.0.34"
    # Without the lean runtime inside, every node needs the building version.
    with pytest.raises(SpecError, match="run different TensorRT versions"):
        plan_targets(nodes, BuildConfig(version_compatible=True, exclude_lean_runtime=True))


# Backend choice ------------------------------------------------------------------------------
def test_choose_backend() -> None:
    good = [node("a", (8, 6)), node("b", (9, 0))]
    assert choose_backend("auto", good) == "tensorrt"
    assert choose_backend("tensorrt", good) == "tensorrt"
    assert choose_backend("onnxruntime", good) == "onnxruntime"
    assert choose_backend("auto", []) == "onnxruntime"
    assert choose_backend("auto", [*good, node("c", (9, 0), tensorrt=None)]) == "onnxruntime"
    # A GPU model with no node that can build has no plan: auto stays on ONNX Runtime.
    assert choose_backend("auto", [*good, node("d", (8, 6), gpu="A40", can_build=False,
                                               module="tensorrt_lean")],
                          BuildConfig(version_compatible=True)) == "onnxruntime"


def test_lean_only_nodes_run_only_version_compatible_plans() -> None:
    """The lean runtime cannot load other plans: a lean-only node must not get TensorRT."""
    lean = [node("a", (8, 6)), node("b", (8, 6), can_build=False, module="tensorrt_lean")]
    assert choose_backend("auto", lean) == "onnxruntime"
    assert choose_backend("auto", lean, BuildConfig(version_compatible=True)) == "tensorrt"
    with pytest.raises(SpecError, match=re.escape(
            "backend 'tensorrt' needs every GPU node to run this job's plans, and 1 of 2 cannot "
            "(b (2x GPU-86, compute capability 8.6): only tensorrt_lean 10.13.0.35, which runs "
            "only version-compatible plans (--version-compatible)); pip install "
            "'.[tensorrt-cu12]' or '.[tensorrt-cu13]' on them (the lean runtime is enough for "
            "plans built --version-compatible), or pass --backend onnxruntime")):
        choose_backend("tensorrt", lean)
    # With every node lean, a version-compatible plan may come from the cache (no builder).
    only_lean = [lean[1]]
    assert choose_backend("tensorrt", only_lean, BuildConfig(version_compatible=True)) == "tensorrt"


def test_tensorrt_without_gpus_or_without_tensorrt_fails_early() -> None:
    with pytest.raises(SpecError, match=re.escape(
            "backend 'tensorrt' needs GPU nodes, and this Ray cluster has none; add GPU workers "
            "or pass --backend onnxruntime")):
        choose_backend("tensorrt", [])
    nodes = [node("a", (9, 0)), node("b", (9, 0), tensorrt=None)]
    with pytest.raises(SpecError, match=re.escape(
            "backend 'tensorrt' needs every GPU node to run this job's plans, and 1 of 2 cannot "
            "(b (2x GPU-90, compute capability 9.0): TensorRT is not installed); pip install "
            "'.[tensorrt-cu12]' or '.[tensorrt-cu13]' on them")):
        choose_backend("tensorrt", nodes)


@pytest.mark.ray
def test_resolve_backend_on_a_cpu_cluster(ray_cluster: None) -> None:
    assert resolve_backend("auto") == "onnxruntime"
    with pytest.raises(SpecError, match="backend 'tensorrt' needs GPU nodes"):
        resolve_backend("tensorrt")


# The object-store hand-off -------------------------------------------------------------------
def job_spec(tmp_path: Path, dataset: Path, model: Path, **kw: object) -> JobSpec:
    settings: dict[str, object] = dict(
        model=str(model), input=str(dataset), output=str(tmp_path / "out"),
        columns=(("image", "img"), ("meta", "features")), keep=("uid", "name"), batch_size=64,
        rows_per_shard=240, backend="tensorrt", workers=2, progress=False)
    settings.update(kw)
    return JobSpec(**settings)  # type: ignore[arg-type]


def run_pool(spec: JobSpec, refs: PlanRefs) -> None:
    """Run every shard of `spec` on ONNX Runtime actors that take their model from `refs`."""
    job = prepare(spec)
    config = WorkerConfig(backend="onnxruntime", backend_config=BackendConfig(device="cpu"),
                          output_url=spec.output, bindings=job.bindings, keep=spec.keep,
                          batch_size=spec.batch_size)
    pool = ShardPool(PoolConfig(workers=2, num_gpus=0, num_cpus=0.5, shards_in_flight=2,
                                max_retries=0), config, refs)
    try:
        info = pool.start(2)
        assert info["plan"] == select_plan(refs.keys, refs.capability or (0, 0),
                                           refs.gpu_name or "")
        outcome = pool.run(job.shards, lambda result, failure: None)
    finally:
        pool.shutdown()
    assert not outcome.failures and len(outcome.results) == len(job.shards)


@pytest.mark.ray
@pytest.mark.parametrize(("capability", "expected"), [((8, 6), "sm_86"), ((9, 0), "sm_90")])
def test_each_actor_runs_the_plan_for_its_gpu(ray_cluster: None, tmp_path: Path, dataset: Path,
                                             capability: tuple[int, int], expected: str) -> None:
    models = {"sm_86": two_input_model(seed=21), "sm_90": two_input_model(seed=22)}
    path = tmp_path / "model.onnx"
    path.write_bytes(models["sm_86"])
    refs = PlanRefs(tuple((key, ray.put(data)) for key, data in sorted(models.items())),
                    capability=capability, gpu_name="")
    spec = job_spec(tmp_path, dataset, path)
    run_pool(spec, refs)
    check_exact(models[expected], read_input(str(dataset)), read_output(spec.output))


@pytest.mark.ray
def test_a_gpu_without_a_plan_stops_the_pool_with_the_reason(ray_cluster: None, tmp_path: Path,
                                                            dataset: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(two_input_model())
    refs = PlanRefs((("sm_86", ray.put(two_input_model())),), capability=(7, 5), gpu_name="")
    with pytest.raises(BackendError, match=re.escape(
            "the workers could not load the model: this worker's GPU has compute capability 7.5, "
            "and the job's plans are for ['sm_86']")):
        run_pool(job_spec(tmp_path, dataset, path), refs)


@pytest.mark.ray
def test_share_plans_puts_each_cached_plan_once(ray_cluster: None, tmp_path: Path,
                                                dataset: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the default cache's home
    source = two_input_model(seed=30)
    path = tmp_path / "model.onnx"
    path.write_bytes(source)
    spec = job_spec(tmp_path, dataset, path)
    nodes = [node("a", (8, 6)), node("b", (9, 0)), node("c", (9, 0))]
    # What a build on each target stored in the cache (here: ONNX models ORT can run).
    stored = {"sm_86-gpu-86": two_input_model(seed=31), "sm_90-gpu-90": two_input_model(seed=32)}
    cache = PlanCache(default_cache_uri())
    for target, data in stored.items():
        cache.commit(PlanKey(digest(source), (), "10.13.0.35", 12, target, spec.build_config()),
                     data)
    job = prepare(spec)
    log = io.StringIO()
    shared = share_plans(job.model_bytes, job.model, spec.model, spec, nodes, log)
    assert shared.refs.keys == ["sm_86-gpu-86", "sm_90-gpu-90"]
    for key, ref in shared.refs.refs:
        assert ray.get(ref) == stored[key]
    assert shared.plans["sm_90-gpu-90"]["source"] == "cache"
    assert shared.plans["sm_90-gpu-90"]["nodes"] == ["b", "c"]
    assert "plan sm_86-gpu-86: cached" in log.getvalue()
    run_pool(spec, dataclasses.replace(shared.refs, capability=(9, 0), gpu_name="GPU-90"))
    check_exact(stored["sm_90-gpu-90"], read_input(str(dataset)), read_output(spec.output))


@pytest.mark.ray
def test_share_plans_refuses_before_any_build(ray_cluster: None, tmp_path: Path,
                                              dataset: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(two_input_model())
    job = prepare(job_spec(tmp_path, dataset, path))
    lean = [node("a", (8, 6), can_build=False, module="tensorrt_lean")]
    spec = job_spec(tmp_path, dataset, path, version_compatible=True)
    with pytest.raises(SpecError, match=re.escape(
            "plan sm_86-gpu-86 is not in the cache (") + ".*" + re.escape(
            ") and no node for it can build it (they have only tensorrt_lean); install the full "
            "tensorrt package on one of them")):
        share_plans(job.model_bytes, job.model, spec.model, spec, lean)
    int8 = job_spec(tmp_path, dataset, path, precision="int8")
    with pytest.raises(SpecError, match="precision int8 needs a model with explicit quantization"):
        share_plans(job.model_bytes, job.model, int8.model, int8, [node("a", (9, 0))])
    fp8 = job_spec(tmp_path, dataset, path, precision="fp8")
    with pytest.raises(SpecError, match=r"precision fp8 needs compute capability 8\.9"):
        share_plans(job.model_bytes, job.model, fp8.model, fp8, [node("a", (8, 6))])


@pytest.mark.ray
def test_foreign_and_stale_plans_are_not_used(ray_cluster: None, tmp_path: Path,
                                              dataset: Path) -> None:
    """A cached plan of another GPU model, or of an older conversion, is a miss."""
    path = tmp_path / "model.onnx"
    path.write_bytes(two_input_model())
    # Without the lean runtime inside, an unsigned cached plan needs no host code, so it may
    # be used (see test_plan_trust for the rules).
    plans = str(tmp_path / "plans")
    spec = job_spec(tmp_path, dataset, path, version_compatible=True, exclude_lean_runtime=True,
                    plan_cache=plans)
    job = prepare(spec)
    cache = PlanCache(plans)
    a10 = node("a", (8, 6), gpu="NVIDIA A10", can_build=False, module="tensorrt_lean")
    a40 = node("b", (8, 6), gpu="NVIDIA A40", can_build=False, module="tensorrt_lean")
    cache.commit(PlanKey(digest(job.model_bytes), (), "10.13.0.35", 12, "sm_86-nvidia-a10",
                         spec.build_config()), two_input_model(seed=5))
    assert share_plans(job.model_bytes, job.model, spec.model, spec, [a10]).plans[
        "sm_86-nvidia-a10"]["source"] == "cache"
    with pytest.raises(SpecError, match=re.escape("plan sm_86-nvidia-a40 is not in the cache")):
        share_plans(job.model_bytes, job.model, spec.model, spec, [a40])
    # TensorRT 11 converts fp16 models before parsing: a plan keyed by another converter
    # version (here: none) is not this one.
    fp16 = job_spec(tmp_path, dataset, path, version_compatible=True, exclude_lean_runtime=True,
                    plan_cache=plans, precision="fp16")
    trt11 = node("c", (9, 0), tensorrt="11.4.0.106", can_build=False, module="tensorrt_lean",
                 gpu="NVIDIA H100")
    cache.commit(PlanKey(digest(job.model_bytes), (), "11.4.0.106", 12, "sm_90-nvidia-h100",
                         fp16.build_config()), two_input_model(seed=6))
    with pytest.raises(SpecError, match=re.escape("plan sm_90-nvidia-h100 is not in the cache")):
        share_plans(job.model_bytes, job.model, fp16.model, fp16, [trt11])
