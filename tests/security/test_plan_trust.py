"""Issue 17, point 2: a plan someone planted in the cache runs no code of theirs.

TensorRT treats deserializing a plan as running its code: a version-compatible plan carries the
lean runtime as host code (loaded only with `engine_host_code_allowed`), and plugins can be
serialized into any plan. The cache used to check only that a plan matched its sidecar, both
in one writable store (by default inside OUTPUT), and version-compatible jobs allowed host code
for whatever plan the cache returned. Now host code is allowed only for plans this run built or
whose sidecar carries an HMAC signature made with a key kept outside the store; with a key set,
a plan without a valid signature is not used at all; the default cache is private to the user.

As in tests/jobs/test_plan_share.py, GPU nodes are `GpuFacts` values, the "plans" are real ONNX
models run by ONNX Runtime actors, and no TensorRT result is imitated. Nodes here have only the
lean runtime, so a plan the cache may not serve cannot be rebuilt and the job stops, saying why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest
import ray

from jobs.plan_cache import PlanCache, PlanKey, default_cache_uri, digest
from jobs.plan_share import PlanRefs, PlanWorker, share_plans
from jobs.plan_signing import PLAN_KEY_ENV, PLAN_KEY_FILE_ENV, PlanSigner, load_signer
from jobs.spec import JobSpec, spec_from_args
from tests.jobs.test_plan_share import job_spec, node
from tests.models import two_input_model
from workers.backends import BackendConfig
from workers.errors import SpecError
from workers.types import WorkerConfig

KEY = "0123456789abcdef0123456789abcdef"
OTHER_KEY = "fedcba9876543210fedcba9876543210"
LEAN = [node("a", (8, 6), can_build=False, module="tensorrt_lean", gpu="NVIDIA A10")]
TARGET = "sm_86-nvidia-a10"  # compute capability and GPU model


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user's cache directory (where the default plan cache lives), and no key set."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-home"))
    monkeypatch.delenv(PLAN_KEY_ENV, raising=False)
    monkeypatch.delenv(PLAN_KEY_FILE_ENV, raising=False)
    return tmp_path / "cache-home"


def setup(tmp_path: Path, dataset: Path, **spec: Any) -> tuple[JobSpec, bytes, PlanKey]:
    source = two_input_model(seed=40)
    path = tmp_path / "model.onnx"
    path.write_bytes(source)
    job = job_spec(tmp_path, dataset, path, plan_cache=str(tmp_path / "plans"), **spec)
    key = PlanKey(digest(source), (), "10.13.0.35", 12, TARGET, job.build_config())
    return job, source, key


def share(job: JobSpec, source: bytes, signer_env: str | None = None) -> tuple[Any, str]:
    from jobs.driver import prepare

    prepared = prepare(job)
    log = io.StringIO()
    shared = share_plans(prepared.model_bytes, prepared.model, job.model, job, LEAN, log)
    return shared, log.getvalue()


def worker_host_code(refs: PlanRefs) -> bool:
    """What the actor's TensorRT runtime would be told: may this plan run host code?"""
    config = WorkerConfig(backend="onnxruntime", backend_config=BackendConfig(device="cpu"),
                          output_url="unused", bindings=())
    worker = PlanWorker(config, dataclasses.replace(refs, capability=(8, 6), gpu_name="NVIDIA A10"))
    try:
        info = worker.load()
        assert info["host_code_allowed"] == worker.backend.config.engine_host_code_allowed
        return bool(worker.backend.config.engine_host_code_allowed)
    finally:
        worker.close()


@pytest.mark.ray
def test_a_planted_plan_needing_host_code_is_not_loaded_without_a_key(
        ray_cluster: None, tmp_path: Path, dataset: Path) -> None:
    job, source, key = setup(tmp_path, dataset, version_compatible=True)
    PlanCache(job.plan_cache).commit(key, two_input_model(seed=66))  # what an attacker writes
    with pytest.raises(SpecError, match=re.escape(
            f"plan {TARGET} is not in the cache (") + ".*" + re.escape(
            "the cached plan was not used: it is not signed (no plan key is set) and a "
            "version-compatible plan runs host code, which only plans this run built or signed "
            "with the plan key may")):
        share(job, source)


@pytest.mark.ray
def test_an_unsigned_plan_without_host_code_loads_with_host_code_disallowed(
        ray_cluster: None, tmp_path: Path, dataset: Path) -> None:
    # Lean nodes run only version-compatible plans; without the lean runtime inside, one needs
    # no host code.
    job, source, key = setup(tmp_path, dataset, version_compatible=True, exclude_lean_runtime=True)
    plan = two_input_model(seed=67)
    PlanCache(job.plan_cache).commit(key, plan)
    shared, log = share(job, source)
    assert ray.get(dict(shared.refs.refs)[TARGET]) == plan
    assert shared.refs.host_code == ()
    assert shared.plans[TARGET]["signature"] == "none (no plan key)"
    assert "not signed (no plan key): loaded with TensorRT host code disallowed" in log
    assert worker_host_code(shared.refs) is False


@pytest.mark.ray
def test_a_signed_plan_may_run_host_code(ray_cluster: None, tmp_path: Path, dataset: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    job, source, key = setup(tmp_path, dataset, version_compatible=True)
    monkeypatch.setenv(PLAN_KEY_ENV, KEY)
    plan = two_input_model(seed=68)
    signer = load_signer(None)
    assert signer is not None
    PlanCache(job.plan_cache).commit(key, plan, signer=signer)  # as a job with the key does
    shared, log = share(job, source)
    assert ray.get(dict(shared.refs.refs)[TARGET]) == plan
    assert shared.refs.host_code == (TARGET,)
    assert shared.plans[TARGET]["signature"] == "verified"
    assert "signature verified" in log
    assert worker_host_code(shared.refs) is True


def tamper(cache: PlanCache, key: PlanKey, how: str) -> None:
    """Change a signed cache entry as someone with write access to the store (not the key) can."""
    sidecar_path = Path(cache.root) / f"{key.fingerprint}.json"
    sidecar = json.loads(sidecar_path.read_text())
    if how == "unsigned":
        sidecar.pop("signature")
    elif how == "other key":
        sidecar["signature"] = PlanSigner(OTHER_KEY.encode(), "test").sign(
            key.fingerprint, Path(cache.plan_url(key.fingerprint, sidecar["plan"]["sha256"])
                                  .removeprefix("file://")).read_bytes())
    elif how == "swapped plan":
        # A new plan with a sidecar that matches it, the old signature kept.
        plan = two_input_model(seed=99)
        sha = hashlib.sha256(plan).hexdigest()
        Path(cache.plan_url(key.fingerprint, sha).removeprefix("file://")).write_bytes(plan)
        sidecar["plan"].update(sha256=sha, bytes=len(plan))
    sidecar_path.write_text(json.dumps(sidecar))


@pytest.mark.ray
@pytest.mark.parametrize(("how", "why"), [
    ("unsigned", "it is not signed"),
    ("other key", "it was signed with another key"),
    ("swapped plan", "its signature does not match the plan"),
])
def test_with_a_key_a_plan_without_a_valid_signature_is_not_used(
        ray_cluster: None, tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch,
        how: str, why: str) -> None:
    job, source, key = setup(tmp_path, dataset, version_compatible=True, exclude_lean_runtime=True)
    monkeypatch.setenv(PLAN_KEY_ENV, KEY)
    cache = PlanCache(job.plan_cache)
    cache.commit(key, two_input_model(seed=69), signer=load_signer(None))
    tamper(cache, key, how)
    with pytest.raises(SpecError, match=re.escape(f"the cached plan was not used: {why}")):
        share(job, source)


def test_the_default_plan_cache_is_private_and_not_in_output(private_cache: Path,
                                                             tmp_path: Path) -> None:
    uri = default_cache_uri()
    assert uri == str(private_cache / "trt-batch-runner" / "plans")
    assert stat.S_IMODE(os.stat(uri).st_mode) == 0o700
    spec = spec_from_args(["--model", "m.onnx", "--input", "in", "--output", str(tmp_path / "o")])
    assert spec.plan_cache is None  # None: the default, which is not under OUTPUT
    assert not uri.startswith(str(tmp_path / "o"))


def test_the_plan_key_comes_from_the_environment_or_a_file(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_signer(None) is None
    monkeypatch.setenv(PLAN_KEY_ENV, KEY)
    signer = load_signer(None)
    assert signer is not None and signer.key == KEY.encode()
    path = tmp_path / "plan.key"
    path.write_text(OTHER_KEY + "\n")
    from_file = load_signer(str(path))
    assert from_file is not None and from_file.key == OTHER_KEY.encode()  # the named file wins
    monkeypatch.setenv(PLAN_KEY_FILE_ENV, str(path))
    monkeypatch.delenv(PLAN_KEY_ENV)
    from_env_file = load_signer(None)
    assert from_env_file is not None and from_env_file.key == OTHER_KEY.encode()
    assert KEY not in repr(signer) and OTHER_KEY not in repr(from_file)


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot read the plan key file '{path}' (FileNotFoundError)"),
    ("short", "the plan key in file '{path}' is 5 bytes; use at least 16 random bytes"),
])
def test_a_bad_plan_key_is_named_without_its_value(tmp_path: Path, content: str | None,
                                                   message: str) -> None:
    path = tmp_path / "plan.key"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SpecError) as caught:
        load_signer(str(path))
    assert message.format(path=path) in str(caught.value)


def test_the_key_file_is_a_setting_and_the_key_never_in_the_spec(tmp_path: Path) -> None:
    path = tmp_path / "plan.key"
    path.write_text(KEY)
    spec = spec_from_args(["--model", "m", "--input", "i", "--output", "o",
                           "--plan-key-file", str(path)])
    assert spec.plan_key_file == str(path)
    assert KEY not in json.dumps(spec.to_json())


def test_which_cached_plans_may_be_used() -> None:
    from jobs.plan_cache import CachedPlan
    from jobs.plan_share import cached_plan_problem
    from workers.plan_build import BuildConfig

    signer = PlanSigner(KEY.encode(), "test")
    vc = BuildConfig.for_batch(16, version_compatible=True)
    no_lean = BuildConfig.for_batch(16, version_compatible=True, exclude_lean_runtime=True)
    plain = BuildConfig.for_batch(16)
    verified = CachedPlan(b"p", {}, "u", unverified=None)
    unsigned = CachedPlan(b"p", {}, "u", unverified="it is not signed")
    no_key = CachedPlan(b"p", {}, "u")
    assert cached_plan_problem(verified, signer, vc) is None
    assert cached_plan_problem(unsigned, signer, plain) == "it is not signed"
    assert cached_plan_problem(no_key, None, plain) is None  # used, host code disallowed
    assert cached_plan_problem(no_key, None, no_lean) is None  # carries no host code
    assert "runs host code" in str(cached_plan_problem(no_key, None, vc))


def test_a_bad_plan_key_fails_before_ray_starts(tmp_path: Path, dataset: Path) -> None:
    from jobs.driver import prepare

    job, _, _ = setup(tmp_path, dataset, plan_key_file=str(tmp_path / "missing.key"))
    with pytest.raises(SpecError, match="cannot read the plan key file"):
        prepare(job)


def test_plans_carrying_plugin_libraries_need_host_code() -> None:
    """A version-compatible plan serializes the --plugins libraries (plugins_to_serialize):
    that is host code, even without the lean runtime inside, so only trusted plans carry it."""
    from jobs.plan_share import needs_host_code
    from workers.plan_build import BuildConfig

    excluded = BuildConfig(profiles=((1, 8, 8),), version_compatible=True,
                           exclude_lean_runtime=True)
    assert needs_host_code(excluded) is False
    assert needs_host_code(dataclasses.replace(excluded, plugins=(("libx.so", "ab" * 32),)))
    assert needs_host_code(BuildConfig(profiles=((1, 8, 8),), plugins=(("libx.so", "ab" * 32),))
                           ) is False  # not version-compatible: nothing serialized
