"""Credentials out of every URI the runner writes or prints.

A URI can carry secrets: `user:password@` before the host, and for HTTP-style schemes a query
string (a presigned S3 or GCS URL's signature and security token, an Azure SAS). `redact`
replaces those parts of every URI in a text with `REDACTED`, keeping the scheme, host and path
so the message still says which object it means. It is applied where the runner's words leave
it: every RunnerError's message (`workers.errors`), the files written to OUTPUT, the lines the
driver prints, and the runner's own log records.

Object-store paths (`s3://`, `gs://`, local files) keep a `?`: there it is part of a key or a
glob, not a query.
"""

from __future__ import annotations

import io
import logging
import re
from typing import Any

REDACTED = "REDACTED"
# Schemes whose `?` starts a query (which may hold a signature or token) and whose
# `user@` is a credential even without a password.
_QUERY_SCHEMES = frozenset({"http", "https", "ftp", "sftp", "ssh", "webhdfs", "swebhdfs",
                            "abfs", "abfss", "az", "adl", "wasb", "wasbs"})
# A URI ends at whitespace, a quote or a bracket: how messages and JSON delimit them.
_URI = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<rest>[^\s'\"`<>()\[\]{}]*)")


def _redact_one(match: re.Match[str]) -> str:
    scheme, rest = match["scheme"], match["rest"]
    query_scheme = scheme.lower() in _QUERY_SCHEMES
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0),
              default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        user, host = authority.rsplit("@", 1)
        # `abfs://container@account` names a container; `user:password@` is always a secret.
        if ":" in user or (query_scheme and not scheme.lower().startswith(("abfs", "az", "wasb"))):
            authority = f"{REDACTED}@{host}"
    if query_scheme:
        cut = min((i for i in (tail.find("?"), tail.find("#")) if i >= 0), default=-1)
        if cut >= 0:
            tail = f"{tail[:cut]}?{REDACTED}"
    return f"{scheme}://{authority}{tail}"


def redact(text: str) -> str:
    """`text` with the credentials of every URI in it replaced by REDACTED (idempotent)."""
    return _URI.sub(_redact_one, text) if "://" in text else text


def redact_json(value: Any) -> Any:
    """A JSON-like value with `redact` applied to every string in it (keys too)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_json(k): redact_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_json(v) for v in value]
    return value


class RedactingStream(io.TextIOBase):
    """A text stream that writes through to `stream` with `redact` applied (the driver's lines)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return bool(self._stream.isatty())


def install_log_redaction() -> None:
    """Redact every log record this process makes, whichever library logs it (idempotent).

    fsspec, aiohttp and botocore log request URLs (at DEBUG, or in retry warnings); a record
    factory is the one place all of them pass through. Records are created only for levels a
    logger emits, so the cost is paid only by records that are written.
    """
    factory = logging.getLogRecordFactory()
    if getattr(factory, "redacts", False):
        return

    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        message = record.getMessage()
        if "://" in message:
            record.msg, record.args = redact(message), None
        return record

    make.redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(make)
