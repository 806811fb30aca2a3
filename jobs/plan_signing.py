"""Plan signatures: an HMAC made with a key kept outside the plan cache, checked before use.

TensorRT treats deserializing a plan as running its code: a version-compatible plan carries
the lean runtime as host code, which the runtime loads only with `engine_host_code_allowed`,
and plugins can be serialized into any plan. Whoever can write the plan cache's store could
so run code on every GPU worker; the cache's own checks (a plan matches its sidecar's digest)
prove nothing, since both sit in that store.

A job with a plan key signs each plan it builds: HMAC-SHA256 over the plan's fingerprint, its
sha256 and its size, in the sidecar. A cached plan is trusted when that signature verifies with
the job's key (the digest is recomputed from the plan's bytes, never read from the sidecar).
The key comes from a file the user names (`--plan-key-file`, `$TRT_BATCH_RUNNER_PLAN_KEY_FILE`)
or `$TRT_BATCH_RUNNER_PLAN_KEY`, stays in the driver, and is never written anywhere.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from workers.errors import SpecError

PLAN_KEY_ENV = "TRT_BATCH_RUNNER_PLAN_KEY"
PLAN_KEY_FILE_ENV = "TRT_BATCH_RUNNER_PLAN_KEY_FILE"
SIGNATURE_FORMAT = "hmac-sha256-v1"
MIN_KEY_BYTES = 16  # 128 bits
MAX_KEY_BYTES = 4096
KEY_HINT = "python -c 'import secrets; print(secrets.token_hex(32))' > plan.key; chmod 600 plan.key"


@dataclass(frozen=True)
class PlanSigner:
    """Signs and verifies plans with one key; `source` says where the key came from."""

    key: bytes = field(repr=False)
    source: str

    @property
    def key_id(self) -> str:
        """Names the key in a sidecar without revealing it (an HMAC of a constant)."""
        return hmac.new(self.key, b"trt-batch-runner plan key id", hashlib.sha256).hexdigest()[:16]

    def _mac(self, fingerprint: str, sha256: str, size: int) -> str:
        message = f"trt-batch-runner plan\n{fingerprint}\n{sha256}\n{size}".encode()
        return hmac.new(self.key, message, hashlib.sha256).hexdigest()

    def sign(self, fingerprint: str, plan: bytes) -> dict[str, Any]:
        """The signature a sidecar carries for `plan` under `fingerprint`."""
        return {"format": SIGNATURE_FORMAT, "key_id": self.key_id,
                "mac": self._mac(fingerprint, hashlib.sha256(plan).hexdigest(), len(plan))}

    def problem(self, sidecar: Mapping[str, Any], fingerprint: str, plan: bytes) -> str | None:
        """Why `plan` is not trusted under `fingerprint` (None: its signature verifies)."""
        signature = sidecar.get("signature")
        if not isinstance(signature, Mapping):
            return "it is not signed"
        if signature.get("format") != SIGNATURE_FORMAT:
            return f"its signature is of format {signature.get('format')!r}, not {SIGNATURE_FORMAT}"
        if signature.get("key_id") != self.key_id:
            return "it was signed with another key"
        expected = self._mac(fingerprint, hashlib.sha256(plan).hexdigest(), len(plan))
        if not hmac.compare_digest(expected, str(signature.get("mac", ""))):
            return "its signature does not match the plan"
        return None


def load_signer(key_file: str | None) -> PlanSigner | None:
    """The job's plan key: the file `key_file` names, else $TRT_BATCH_RUNNER_PLAN_KEY_FILE's,
    else $TRT_BATCH_RUNNER_PLAN_KEY; None when none is set. Errors never show the key."""
    path = key_file or os.environ.get(PLAN_KEY_FILE_ENV)
    if path:
        source = f"file '{path}'"
        try:
            with open(os.path.expanduser(path), "rb") as f:
                key = f.read(MAX_KEY_BYTES + 1).strip()
        except OSError as exc:
            raise SpecError(f"cannot read the plan key file '{path}' ({exc.__class__.__name__}); "
                            "check --plan-key-file (on a cluster: a path on the node the driver "
                            "runs on)") from None
    elif os.environ.get(PLAN_KEY_ENV):
        source = f"${PLAN_KEY_ENV}"
        key = os.environ[PLAN_KEY_ENV].strip().encode()
    else:
        return None
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise SpecError(f"the plan key in {source} is {len(key)} bytes; use at least "
                        f"{MIN_KEY_BYTES} random bytes (and at most {MAX_KEY_BYTES}): {KEY_HINT}")
    return PlanSigner(key=key, source=source)
