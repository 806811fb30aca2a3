"""The plan cache: plans keyed by a fingerprint of everything that makes two plans differ.

Layout under the cache URI (any fsspec URL; default OUTPUT/_plans):

    FINGERPRINT.json                 sidecar: the fingerprint's inputs, the plan's name and
                                     sha256, its I/O tensors, build seconds, builder
    FINGERPRINT/SHA256[:16].plan     the plan, named by its own content
    timing/TENSORRT-TARGET.cache     TensorRT timing cache, shared by builds on that target
                                     (a compute capability and GPU model, or ampere_plus)

A commit writes the plan under its content name first, then the sidecar, each in one atomic
write (temp file and rename locally, one PUT on object stores). Readers start from the sidecar
and check the plan's size and sha256 against it, so they see a complete plan or a miss, never a
mix: two jobs that build the same fingerprint at once each write their own plan object, and
whichever sidecar lands last names a plan that is already complete.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from workers.errors import StorageError
from workers.plan_build import BuildConfig
from workers.storage import filesystem, read_bytes, storage_errors, write_bytes_atomic

SIDECAR_FORMAT = 1
PLANS_DIR = "_plans"


@dataclass(frozen=True)
class PlanKey:
    """Everything a plan depends on; `fingerprint` hashes it."""

    model_sha256: str
    external_data: tuple[tuple[str, str], ...]  # (location, sha256) of external weight files
    tensorrt: str
    cuda_major: int | None
    #: "sm_86-nvidia-a10" (a compute capability and GPU model) or "ampere_plus" (hardware-
    #: compatible: one plan for every Ampere-or-newer model)
    target: str
    build: BuildConfig
    #: the fp16/bf16 converter (`workers.onnx_precision.converter_version`) when the plan is
    #: built from a converted model, else None
    conversion: str | None = None

    def inputs(self) -> dict[str, Any]:
        """The fingerprint's inputs as JSON (also written to the sidecar)."""
        return {"model_sha256": self.model_sha256,
                "external_data": [list(e) for e in self.external_data],
                "tensorrt": self.tensorrt, "cuda_major": self.cuda_major,
                "target": self.target, "build": self.build.to_json(),
                "conversion": self.conversion}

    @property
    def fingerprint(self) -> str:
        text = json.dumps({"format": SIDECAR_FORMAT, **self.inputs()}, sort_keys=True,
                          separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class CachedPlan:
    """A plan read from (or just written to) the cache, with its sidecar."""

    plan: bytes
    sidecar: dict[str, Any]
    url: str


def default_cache_uri(output: str) -> str:
    """Plans live next to the parts unless the spec names a cache: OUTPUT/_plans."""
    return f"{output.rstrip('/')}/{PLANS_DIR}"


def sidecar_for(key: PlanKey, plan: bytes, plan_name: str, info: Mapping[str, Any]
                ) -> dict[str, Any]:
    """The sidecar of `plan`: fingerprint inputs, the plan's name and digest, build facts."""
    return {"format": SIDECAR_FORMAT, "fingerprint": key.fingerprint, "key": key.inputs(),
            "plan": {"name": plan_name, "sha256": hashlib.sha256(plan).hexdigest(),
                     "bytes": len(plan)},
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            **dict(info)}


class PlanCache:
    """Plans and timing caches under one URI, written atomically and read with validation."""

    def __init__(self, uri: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = filesystem(self.uri, self.storage_options)
        self.root = self.root.rstrip("/")

    def _url(self, name: str) -> str:
        return str(self.fs.unstrip_protocol(f"{self.root}/{name}"))

    def sidecar_url(self, fingerprint: str) -> str:
        return self._url(f"{fingerprint}.json")

    def plan_url(self, fingerprint: str, sha256: str) -> str:
        return self._url(f"{fingerprint}/{sha256[:16]}.plan")

    def timing_cache_url(self, tensorrt: str, target: str) -> str:
        return self._url(f"timing/{tensorrt}-{target}.cache")

    def _read(self, url: str) -> bytes | None:
        """The object's bytes, or None when it does not exist; other failures raise."""
        fs, path = filesystem(url, self.storage_options)
        # Another process (a build task) may have written it since this one last listed.
        fs.invalidate_cache()
        with storage_errors(f"cannot read plan cache '{url}'"):
            try:
                data: bytes = fs.cat_file(path)
            except FileNotFoundError:
                return None
        return data

    def lookup(self, key: PlanKey) -> CachedPlan | None:
        """The plan for `key`, or None when absent or incomplete (then build and commit it)."""
        fingerprint = key.fingerprint
        raw = self._read(self.sidecar_url(fingerprint))
        if raw is None:
            return None
        try:
            sidecar = json.loads(raw)
            plan_meta = sidecar["plan"]
            valid = (sidecar.get("format") == SIDECAR_FORMAT
                     and sidecar.get("fingerprint") == fingerprint
                     and sidecar.get("key") == key.inputs()
                     and isinstance(plan_meta["sha256"], str))
        except (ValueError, KeyError, TypeError):
            valid = False
        if not valid:
            return None  # not ours or from an older format: rebuilding overwrites it
        url = self.plan_url(fingerprint, plan_meta["sha256"])
        plan = self._read(url)
        if (plan is None or len(plan) != plan_meta.get("bytes")
                or hashlib.sha256(plan).hexdigest() != plan_meta["sha256"]):
            return None
        return CachedPlan(plan=plan, sidecar=sidecar, url=url)

    def commit(self, key: PlanKey, plan: bytes, info: Mapping[str, Any] | None = None
               ) -> CachedPlan:
        """Store `plan` for `key`: the plan object first, then the sidecar that names it."""
        sha = hashlib.sha256(plan).hexdigest()
        url = self.plan_url(key.fingerprint, sha)
        sidecar = sidecar_for(key, plan, url.rsplit("/", 1)[-1], info or {})
        write_bytes_atomic(url, plan, self.storage_options)
        write_bytes_atomic(self.sidecar_url(key.fingerprint),
                           json.dumps(sidecar, indent=2).encode(), self.storage_options)
        return CachedPlan(plan=plan, sidecar=sidecar, url=url)

    def read_timing_cache(self, tensorrt: str, target: str) -> bytes | None:
        """The timing cache for builds with this TensorRT on this target, if one was saved."""
        try:
            return self._read(self.timing_cache_url(tensorrt, target))
        except StorageError:
            return None  # timings only speed a build up; never fail one for them

    def write_timing_cache(self, tensorrt: str, target: str, data: bytes) -> None:
        write_bytes_atomic(self.timing_cache_url(tensorrt, target), data, self.storage_options)


def read_external_data(model_uri: str, locations: list[str],
                       storage_options: Mapping[str, Any] | None = None) -> dict[str, bytes]:
    """The external weight files a model names, read relative to the model's directory."""
    base = model_uri.rsplit("/", 1)[0] if "/" in model_uri else "."
    out = {}
    for location in locations:
        url = f"{base}/{location}"
        try:
            out[location] = read_bytes(url, storage_options)
        except StorageError as exc:
            raise StorageError(f"model '{model_uri}' keeps weights in '{location}', which cannot "
                               f"be read ({exc}); keep the external data files next to the model"
                               ) from exc
    return out


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
