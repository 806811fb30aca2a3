"""The plan cache: plans keyed by a fingerprint of everything that makes two plans differ.

Layout under the cache URI (any fsspec URL; default `default_cache_uri()`, private to the user on
the driver's machine, never OUTPUT: outputs are shared more widely than build artifacts):

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

Those checks find damage, not intent: the plan and its sidecar sit in the same store. With a plan
key (`jobs.plan_signing`), a commit signs the plan in its sidecar, and `lookup` says whether the
signature verifies; what a caller may do with an unverified plan is `jobs.plan_share`'s call.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from workers.errors import StorageError
from workers.plan_build import BuildConfig
from workers.storage import filesystem, storage_errors, write_bytes_atomic

if TYPE_CHECKING:
    from jobs.plan_signing import PlanSigner

SIDECAR_FORMAT = 1


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
    #: None when the plan's signature verified with the job's plan key; else why it did not
    #: ("no plan key is set" when the job has none).
    unverified: str | None = "no plan key is set"


def default_cache_uri() -> str:
    """The user's own plan cache on the driver's machine, made private (0700) if new.

    `$XDG_CACHE_HOME/trt-batch-runner/plans`, else `~/.cache/trt-batch-runner/plans`. Under
    `ray job submit` the driver runs on the head node, so plans persist there for later jobs;
    a cache shared by several clusters is a `--plan-cache` URL (and wants a plan key).
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = os.path.join(base, "trt-batch-runner")
    path = os.path.join(root, "plans")
    for directory in (root, path):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if os.stat(directory).st_uid == os.getuid():
            os.chmod(directory, 0o700)  # also when an older umask made it wider
    return path


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

    def lookup(self, key: PlanKey, signer: PlanSigner | None = None) -> CachedPlan | None:
        """The plan for `key`, or None when absent or incomplete (then build and commit it).

        With `signer`, the result says whether its signature verifies (`unverified`).
        """
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
        if signer is None:
            return CachedPlan(plan=plan, sidecar=sidecar, url=url)
        return CachedPlan(plan=plan, sidecar=sidecar, url=url,
                          unverified=signer.problem(sidecar, fingerprint, plan))

    def commit(self, key: PlanKey, plan: bytes, info: Mapping[str, Any] | None = None,
               signer: PlanSigner | None = None) -> CachedPlan:
        """Store `plan` for `key`: the plan object first, then the sidecar that names it (and,
        with `signer`, signs it)."""
        sha = hashlib.sha256(plan).hexdigest()
        url = self.plan_url(key.fingerprint, sha)
        sidecar = sidecar_for(key, plan, url.rsplit("/", 1)[-1], info or {})
        if signer is not None:
            sidecar["signature"] = signer.sign(key.fingerprint, plan)
        write_bytes_atomic(url, plan, self.storage_options)
        write_bytes_atomic(self.sidecar_url(key.fingerprint),
                           json.dumps(sidecar, indent=2).encode(), self.storage_options)
        return CachedPlan(plan=plan, sidecar=sidecar, url=url,
                          unverified=None if signer is not None else "no plan key is set")

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
    """The external weight files a model names, read from the model's own directory only."""
    from workers.external_data import read_external_files

    return read_external_files(model_uri, locations, storage_options)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
