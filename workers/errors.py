"""The runner's exceptions: one root, a few children that also subclass the built-in they resemble."""

from __future__ import annotations

from typing import Any

from workers.redact import redact


class RunnerError(Exception):
    """Root of every error the runner raises on purpose; its message is meant for the user.

    The message is redacted as the error is made (`workers.redact`): the user reads it, the
    manifest records it and Ray's logs may print it, so no URI's credentials are ever in it.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))


class SpecError(RunnerError, ValueError):
    """The job spec (flags, YAML, model or input schema) cannot be honoured."""


class StorageError(RunnerError, OSError):
    """Reading or writing object storage failed."""


class TransientStorageError(StorageError):
    """Storage kept failing in a way that may pass (timeouts, throttling, 5xx): worth a later retry."""


class DataError(RunnerError, ValueError):
    """A shard's data cannot be turned into model input (corrupt file, wrong shape, bad values)."""


class BackendError(RunnerError, RuntimeError):
    """A backend failed to load a model or run a batch."""


class MissingDependencyError(RunnerError, ImportError):
    """An optional package is needed and not installed; the message says how to install it."""


class OutputConflictError(RunnerError, FileExistsError):
    """The output already holds another job's parts, or another job is writing it."""
