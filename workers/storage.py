"""Storage through fsspec only: opening filesystems, versions of files, error translation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from workers.errors import MissingDependencyError, StorageError

# Keys that fsspec implementations put in `info()` and that change when a file is rewritten,
# most specific first: S3 ETag, GCS generation/md5, local and others' modification time.
_VERSION_KEYS = ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "last_modified",
                 "created")


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None
               ) -> tuple[fsspec.AbstractFileSystem, str]:
    """`(fs, path)` for a URL; a missing fsspec implementation says which extra to install."""
    try:
        return fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as exc:
        raise MissingDependencyError(
            f"no filesystem for '{url}': {exc}; pip install '.[s3]' for s3://, '.[gcs]' for gs://"
        ) from exc
    except ValueError as exc:
        raise StorageError(f"cannot open '{url}': {exc}") from exc


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


@contextlib.contextmanager
def storage_errors(action: str) -> Iterator[None]:
    """Turn filesystem exceptions into a StorageError that says what was being done."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as exc:
        raise StorageError(f"{action}: not found ({exc})") from exc
    except PermissionError as exc:
        raise StorageError(f"{action}: permission denied ({exc}); check the credentials") from exc
    except OSError as exc:
        raise StorageError(f"{action}: {exc.__class__.__name__}: {exc}") from exc


def read_bytes(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """Read a whole object."""
    fs, path = filesystem(url, storage_options)
    with storage_errors(f"cannot read '{url}'"):
        data: bytes = fs.cat_file(path)
    return data


def write_bytes_atomic(url: str, data: bytes,
                       storage_options: Mapping[str, Any] | None = None) -> None:
    """Write a small object so that readers see the old or the new bytes, never a mix."""
    import os
    import uuid

    fs, path = filesystem(url, storage_options)
    with storage_errors(f"cannot write '{url}'"):
        if is_local(fs):
            parent = os.path.dirname(path)
            os.makedirs(parent, exist_ok=True)
            tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            # One PUT: object stores make it visible whole or not at all.
            fs.pipe_file(path, data)
