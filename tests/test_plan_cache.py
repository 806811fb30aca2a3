"""The plan cache: fingerprints, atomic commits, validated reads, and racing writers.

The cache stores opaque bytes, so these tests commit arbitrary payloads (no TensorRT result is
imitated); the races run real processes against a local directory and a real S3 server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import queue
from pathlib import Path
from typing import Any

import pytest

from jobs.plan_cache import (
    PlanCache,
    PlanKey,
    default_cache_uri,
    read_external_data,
)
from workers.errors import StorageError
from workers.plan_build import BuildConfig

BASE = PlanKey(model_sha256="a" * 64, external_data=(), tensorrt="10.13.0.35", cuda_major=12,
               target="sm_86", build=BuildConfig.for_batch(256))


def payload(seed: int, size: int = 200_000) -> bytes:
    return os.urandom(8) + hashlib.sha256(str(seed).encode()).digest() * (size // 32)


# Fingerprints --------------------------------------------------------------------------------
def test_fingerprint_is_stable_and_hex() -> None:
    again = PlanKey(**{f.name: getattr(BASE, f.name) for f in dataclasses.fields(BASE)})
    assert BASE.fingerprint == again.fingerprint
    assert len(BASE.fingerprint) == 64 and int(BASE.fingerprint, 16) >= 0


@pytest.mark.parametrize("change", [
    {"model_sha256": "b" * 64},
    {"external_data": (("weights.bin", "c" * 64),)},
    {"tensorrt": "10.13.0.36"},
    {"tensorrt": "11.0.0.1"},
    {"cuda_major": 13},
    {"target": "sm_90"},
    {"target": "ampere_plus"},
    {"target": "sm_86-nvidia-a40"},  # same compute capability, another device model
    {"conversion": "onnxconverter-common 1.16.0; passes r2"},  # a plan from a converted model
    {"build": BuildConfig.for_batch(256, precision="fp16")},
    {"build": BuildConfig.for_batch(128)},
    {"build": BuildConfig(profiles=((8, 256, 256),))},
    {"build": BuildConfig.for_batch(256, workspace=1 << 30)},
    {"build": BuildConfig.for_batch(256, optimization_level=5)},
    {"build": BuildConfig.for_batch(256, hardware_compatible=True)},
    {"build": BuildConfig.for_batch(256, version_compatible=True)},
    {"build": BuildConfig.for_batch(256, version_compatible=True, exclude_lean_runtime=True)},
])
def test_every_input_changes_the_fingerprint(change: dict[str, Any]) -> None:
    assert dataclasses.replace(BASE, **change).fingerprint != BASE.fingerprint


def test_a_fixed_converter_is_a_new_plan() -> None:
    before = dataclasses.replace(BASE, conversion="onnxconverter-common 1.16.0; passes r2")
    after = dataclasses.replace(BASE, conversion="onnxconverter-common 1.16.0; passes r3")
    assert before.fingerprint != after.fingerprint


def test_default_cache_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_uri() == str(tmp_path / "xdg" / "trt-batch-runner" / "plans")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_uri() == str(tmp_path / "home" / ".cache" / "trt-batch-runner" / "plans")


# Commit and lookup ---------------------------------------------------------------------------
def test_every_key_field_survives_the_sidecar(tmp_path: Path) -> None:
    """Lookups compare the sidecar's JSON with the key: tuples must come back equal."""
    key = dataclasses.replace(
        BASE, conversion="onnxconverter-common 1.16.0; passes r2", target="sm_90-nvidia-h200",
        build=BuildConfig(profiles=((1, 8, 16), (17, 64, 64)), plugins=(("a.so", "1" * 64),)))
    cache = PlanCache(str(tmp_path / "plans"))
    cache.commit(key, payload(7))
    assert cache.lookup(key) is not None


def test_commit_then_lookup(tmp_path: Path) -> None:
    cache = PlanCache(str(tmp_path / "plans"))
    assert cache.lookup(BASE) is None
    plan = payload(1)
    committed = cache.commit(BASE, plan, {"build_seconds": 1.5, "inputs": []})
    found = cache.lookup(BASE)
    assert found is not None and found.plan == plan
    assert found.sidecar["fingerprint"] == BASE.fingerprint
    assert found.sidecar["key"] == BASE.inputs()
    assert found.sidecar["plan"] == {"name": committed.url.rsplit("/", 1)[-1],
                                     "sha256": hashlib.sha256(plan).hexdigest(), "bytes": len(plan)}
    assert found.sidecar["build_seconds"] == 1.5
    sidecar = json.loads((tmp_path / "plans" / f"{BASE.fingerprint}.json").read_text())
    assert sidecar == found.sidecar
    # Another key is another entry.
    assert cache.lookup(dataclasses.replace(BASE, target="sm_90")) is None


def test_a_later_commit_replaces_the_entry(tmp_path: Path) -> None:
    cache = PlanCache(str(tmp_path))
    cache.commit(BASE, payload(1))
    cache.commit(BASE, payload(2))
    found = cache.lookup(BASE)
    assert found is not None and found.plan[8:] == payload(2)[8:]


@pytest.mark.parametrize("damage", ["sidecar-json", "sidecar-other-key", "sidecar-format",
                                    "plan-missing", "plan-truncated", "plan-replaced"])
def test_damaged_entries_are_misses(tmp_path: Path, damage: str) -> None:
    cache = PlanCache(str(tmp_path))
    committed = cache.commit(BASE, payload(3))
    sidecar_path = tmp_path / f"{BASE.fingerprint}.json"
    plan_path = Path(committed.url.removeprefix("file://"))
    sidecar = json.loads(sidecar_path.read_text())
    if damage == "sidecar-json":
        sidecar_path.write_text("{not json")
    elif damage == "sidecar-other-key":
        sidecar["key"]["tensorrt"] = "9.9"
        sidecar_path.write_text(json.dumps(sidecar))
    elif damage == "sidecar-format":
        sidecar["format"] = 0
        sidecar_path.write_text(json.dumps(sidecar))
    elif damage == "plan-missing":
        plan_path.unlink()
    elif damage == "plan-truncated":
        plan_path.write_bytes(plan_path.read_bytes()[:-1])
    else:
        data = bytearray(plan_path.read_bytes())
        data[100] ^= 0xFF
        plan_path.write_bytes(bytes(data))
    assert cache.lookup(BASE) is None
    cache.commit(BASE, payload(4))  # rebuilding repairs the entry
    assert cache.lookup(BASE) is not None


def test_timing_cache_round_trip(tmp_path: Path) -> None:
    cache = PlanCache(str(tmp_path))
    assert cache.read_timing_cache("10.13.0.35", "sm_86") is None
    cache.write_timing_cache("10.13.0.35", "sm_86", b"timings")
    assert cache.read_timing_cache("10.13.0.35", "sm_86") == b"timings"
    assert cache.read_timing_cache("10.13.0.35", "sm_90") is None
    assert (tmp_path / "timing" / "10.13.0.35-sm_86.cache").exists()


def test_external_data_is_read_next_to_the_model(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"w" * 10)
    model = str(tmp_path / "m.onnx")
    assert read_external_data(model, ["weights.bin"]) == {"weights.bin": b"w" * 10}
    with pytest.raises(StorageError, match=r"model '.*m\.onnx' keeps weights in 'gone\.bin', "
                                           r"which cannot be read"):
        read_external_data(model, ["gone.bin"])


@pytest.mark.s3
def test_commit_and_lookup_on_s3(s3_bucket: str) -> None:
    cache = PlanCache(f"{s3_bucket}/out/_plans")
    assert cache.lookup(BASE) is None
    plan = payload(5)
    cache.commit(BASE, plan, {"gpu": "test"})
    found = cache.lookup(BASE)
    assert found is not None and found.plan == plan and found.sidecar["gpu"] == "test"
    assert found.url.startswith(f"{s3_bucket}/out/_plans/{BASE.fingerprint}/")


# Races ---------------------------------------------------------------------------------------
WRITERS, COMMITS = 3, 12


def _writer(uri: str, index: int, barrier: Any, errors: Any) -> None:
    try:
        cache = PlanCache(uri)
        barrier.wait()
        for round_ in range(COMMITS):
            cache.commit(BASE, payload(index * 1000 + round_), {"writer": index})
    except BaseException as exc:  # reported to the test process
        errors.put(f"writer {index}: {exc!r}")


def _reader(uri: str, done: Any, results: Any) -> None:
    hits = misses = 0
    problems: list[str] = []
    try:
        cache = PlanCache(uri)
        while True:
            # One more lookup after the writers are done: that one must hit.
            last = done.is_set()
            found = cache.lookup(BASE)
            if found is None:
                misses += 1
                if last:
                    break
                continue
            hits += 1
            meta = found.sidecar["plan"]
            if hashlib.sha256(found.plan).hexdigest() != meta["sha256"]:
                problems.append("plan does not match its sidecar")
            if found.plan[8:] not in {payload(w * 1000 + r)[8:] for w in range(WRITERS)
                                      for r in range(COMMITS)}:
                problems.append("plan is no writer's payload")
            if last:
                break
    except BaseException as exc:
        problems.append(repr(exc))
    results.put((hits, misses, problems))


def race(uri: str) -> None:
    """Writers commit different plans for one key at once while readers look it up."""
    ctx = multiprocessing.get_context("spawn")
    barrier, done = ctx.Barrier(WRITERS), ctx.Event()
    errors, results = ctx.Queue(), ctx.Queue()
    readers = [ctx.Process(target=_reader, args=(uri, done, results)) for _ in range(2)]
    writers = [ctx.Process(target=_writer, args=(uri, i, barrier, errors)) for i in range(WRITERS)]
    for p in readers + writers:
        p.start()
    for p in writers:
        p.join(timeout=300)
    done.set()
    outcomes = [results.get(timeout=300) for _ in readers]
    for p in readers:
        p.join(timeout=60)
    failures = []
    while True:
        try:
            failures.append(errors.get_nowait())
        except queue.Empty:
            break
    assert not failures
    assert all(p.exitcode == 0 for p in readers + writers)
    for hits, _, problems in outcomes:
        assert problems == []
        assert hits >= 1
    final = PlanCache(uri).lookup(BASE)
    assert final is not None and final.sidecar["writer"] in range(WRITERS)


@pytest.mark.subprocess
def test_racing_writers_and_readers_local(tmp_path: Path) -> None:
    race(str(tmp_path / "plans"))
    leftovers = [p.name for p in (tmp_path / "plans").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


@pytest.mark.subprocess
@pytest.mark.s3
def test_racing_writers_and_readers_s3(s3_bucket: str) -> None:
    race(f"{s3_bucket}/plans")
