"""Storage through fsspec only: filesystems, file versions, error translation, retries."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from workers.errors import (
    MissingDependencyError,
    RunnerError,
    StorageError,
    TransientStorageError,
)
from workers.redact import redact

T = TypeVar("T")
log = logging.getLogger(__name__)

# Keys that fsspec implementations put in `info()` and that change when a file is rewritten,
# most specific first: S3 ETag, GCS generation/md5, local and others' modification time.
_VERSION_KEYS = ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "last_modified",
                 "created")

# errno values that mean "try again later": S3's SlowDown/503 (EBUSY) and 500 (EREMOTEIO) as
# s3fs translates them, codes it does not know (EIO), and the network's own failures.
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "EBUSY", "EREMOTEIO", "EIO", "EAGAIN", "ETIMEDOUT", "ECONNRESET", "ECONNABORTED",
        "ECONNREFUSED", "EPIPE", "ENETDOWN", "ENETUNREACH", "EHOSTUNREACH", "ENETRESET")
    if hasattr(errno, name))

# Exceptions that storage clients raise without subclassing OSError (botocore, aiohttp,
# urllib3, fsspec), matched by class name so that none of those packages is imported here.
_TRANSIENT_CLASSES = frozenset({
    "HTTPClientError", "ConnectionError", "ConnectionClosedError", "EndpointConnectionError",
    "ReadTimeoutError", "ConnectTimeoutError", "Timeout", "IncompleteReadError", "IncompleteRead",
    "ResponseStreamingError", "ResponseParserError", "ClientPayloadError", "ClientConnectionError",
    "ServerDisconnectedError", "ServerTimeoutError", "FSTimeoutError", "ProtocolError",
})

# Errors that no retry can fix: the object is missing, access is denied, the request is wrong.
_PERMANENT_OSERRORS = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError,
                       NotADirectoryError)


@dataclass(frozen=True)
class RetryPolicy:
    """How a storage call is retried: `attempts` in all, exponential backoff with jitter between.

    Applies on top of the storage client's own retries (botocore retries 5xx and throttling a
    few times itself; set them with `storage_options: {config_kwargs: {retries: ...}}`).
    """

    attempts: int = 5
    backoff: float = 0.25  # seconds before the second attempt; doubles each time
    max_backoff: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError(f"RetryPolicy backoff must be >= 0, got {self.backoff}, "
                             f"{self.max_backoff}")

    def wait(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1-based): half fixed, half random."""
        ceiling = min(self.max_backoff, self.backoff * 2 ** (retry - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


DEFAULT_RETRY = RetryPolicy()


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None
               ) -> tuple[fsspec.AbstractFileSystem, str]:
    """`(fs, path)` for a URL; a missing fsspec implementation says which extra to install.

    `storage_options` may be frozen (nested `(key, value)` tuples, as specs carry them).
    """
    try:
        return fsspec.core.url_to_fs(url, **_thaw(dict(storage_options or {})))
    except ImportError as exc:
        raise MissingDependencyError(
            f"no filesystem for '{url}': {exc}; pip install '.[s3]' for s3://, '.[gcs]' for gs://"
        ) from exc
    except ValueError as exc:
        raise StorageError(f"cannot open '{url}': {exc}") from exc


def _thaw(value: Any) -> Any:
    """Nested `(key, value)` tuples (a frozen mapping) back to dicts, e.g. `config_kwargs`."""
    if isinstance(value, dict):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple) and value and all(
            isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) for v in value):
        return {k: _thaw(v) for k, v in value}
    return value


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True where rename within a directory is atomic (a local POSIX filesystem)."""
    return isinstance(fs, LocalFileSystem)


def file_version(info: Mapping[str, Any]) -> str:
    """A string that changes whenever the file is rewritten (etag, generation or mtime)."""
    for key in _VERSION_KEYS:
        value = info.get(key)
        if value is not None:
            return f"{key}={value}"
    return ""


def is_transient(exc: BaseException) -> bool:
    """True for a storage failure that may pass on its own: timeouts, dropped connections,
    throttling, server errors. False for missing objects, denied access and bad requests."""
    if isinstance(exc, TransientStorageError):
        return True
    if isinstance(exc, (RunnerError, *_PERMANENT_OSERRORS)):
        return False
    if isinstance(exc, TimeoutError | ConnectionError):
        return True
    status = getattr(exc, "status", None)  # aiohttp/HTTP filesystems: the response status
    if isinstance(status, int):
        return status >= 500 or status == 429
    if {cls.__name__ for cls in type(exc).__mro__} & _TRANSIENT_CLASSES:
        return True
    if isinstance(exc, OSError):
        return exc.errno is None or exc.errno in _TRANSIENT_ERRNOS
    return False


def is_storage_failure(exc: BaseException) -> bool:
    """True for exceptions that come from storage (OSError or a storage client's own types)."""
    if isinstance(exc, RunnerError):
        return isinstance(exc, StorageError)
    return isinstance(exc, OSError) or is_transient(exc)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or repr(exc)
    return f"{exc.__class__.__name__}: {text}"


def storage_error(action: str, exc: BaseException) -> StorageError:
    """The StorageError a user reads for `exc`, raised while doing `action`."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"{action}: not found ({exc})")
    if isinstance(exc, PermissionError):
        return StorageError(f"{action}: permission denied ({exc}); check the credentials and "
                            "the bucket policy")
    if is_transient(exc):
        return TransientStorageError(f"{action}: {_describe(exc)}")
    return StorageError(f"{action}: {_describe(exc)}")


@contextlib.contextmanager
def storage_errors(action: str) -> Iterator[None]:
    """Turn storage exceptions into a StorageError that says what was being done (no retry)."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        if not is_storage_failure(exc):
            raise
        raise storage_error(action, exc) from exc


def retrying(action: str, call: Callable[[], T], policy: RetryPolicy = DEFAULT_RETRY) -> T:
    """Run `call`, retrying transient storage failures with backoff.

    A permanent failure raises StorageError at once; a transient one that outlasts
    `policy.attempts` raises TransientStorageError, both naming `action` and the storage's error.
    """
    started = time.monotonic()
    for attempt in range(1, policy.attempts + 1):
        try:
            return call()
        except StorageError:
            raise
        except Exception as exc:
            if not is_storage_failure(exc):
                raise
            if not is_transient(exc):
                raise storage_error(action, exc) from exc
            if attempt == policy.attempts:
                raise TransientStorageError(
                    f"{action}: {_describe(exc)}; still failing after {attempt} attempt(s) over "
                    f"{time.monotonic() - started:.1f}s (the storage is unavailable or "
                    "throttling); rerun the job to resume") from exc
            wait = policy.wait(attempt)
            log.warning("%s: %s; retry %d/%d in %.2fs", redact(action), redact(_describe(exc)), attempt,
                        policy.attempts - 1, wait)
            time.sleep(wait)  # backoff, not synchronization: give the store time to recover
    raise AssertionError("unreachable")  # the loop returns or raises


def read_bytes(url: str, storage_options: Mapping[str, Any] | None = None,
               policy: RetryPolicy = DEFAULT_RETRY) -> bytes:
    """Read a whole object."""
    fs, path = filesystem(url, storage_options)
    data: bytes = retrying(f"cannot read '{url}'", lambda: fs.cat_file(path), policy)
    return data


def local_temp_name(name: str) -> str:
    """The temporary name `write_bytes_atomic` and `create_exclusive` write `name` under."""
    return f".{name}.{uuid.uuid4().hex}.tmp"


def is_local_temp_of(name: str, candidate: str) -> bool:
    """True when `candidate` is a temporary file of `name` (see `local_temp_name`)."""
    prefix, suffix = f".{name}.", ".tmp"
    middle = candidate[len(prefix):-len(suffix)]
    return (candidate.startswith(prefix) and candidate.endswith(suffix) and len(middle) == 32
            and all(c in "0123456789abcdef" for c in middle))


@contextlib.contextmanager
def _local_temp(path: str, data: bytes) -> Iterator[str]:
    """`data` in a synced temporary file beside `path` (so a rename or link into place is
    atomic); the temporary name is removed on the way out, whatever happened."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, local_temp_name(os.path.basename(path)))
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        yield tmp
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes_atomic(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None,
                       policy: RetryPolicy = DEFAULT_RETRY) -> None:
    """Write a small object so that readers see the old or the new bytes, never a mix."""
    fs, path = filesystem(url, storage_options)

    def write() -> None:
        if is_local(fs):
            with _local_temp(path, data) as tmp:
                os.replace(tmp, path)
        else:
            # One PUT: object stores make it visible whole or not at all.
            fs.pipe_file(path, data)

    retrying(f"cannot write '{url}'", write, policy)


def create_exclusive(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None,
                     policy: RetryPolicy = DEFAULT_RETRY) -> bool:
    """Create an object only if none exists; False if one does.

    Atomic on local disks (the bytes go to a temporary file that is hard-linked into place:
    the link fails if the name exists, and readers never see a partial object) and where the
    store does conditional writes through fsspec's `mode="create"` (S3: If-None-Match). Other
    fsspec stores fall back to fsspec's check-then-write, which two writers can both pass.
    A retried create whose first attempt did land returns False: callers read the object back
    to tell that case apart.
    """
    fs, path = filesystem(url, storage_options)

    def create_local() -> bool:
        with _local_temp(path, data) as tmp:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        return True

    def create() -> bool:
        if is_local(fs):
            return create_local()
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    return retrying(f"cannot create '{url}'", create, policy)


def remove_file(url: str, storage_options: Mapping[str, Any] | None = None,
                policy: RetryPolicy = DEFAULT_RETRY) -> bool:
    """Delete one object; False if it did not exist."""
    fs, path = filesystem(url, storage_options)

    def remove() -> bool:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            return False
        return True

    return retrying(f"cannot remove '{url}'", remove, policy)
