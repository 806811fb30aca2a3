"""The paths a user types: one canonical form, and what a relative path means under `ray job submit`.

A job's identity, its manifest and its messages use the canonical form, so `demo-data/x`,
`./demo-data/x/` and `$PWD/demo-data/x` are the same input, and `s3://b/in/` is `s3://b/in`.

Under `ray job submit` the driver runs in Ray's temporary copy of `--working-dir`
(`/tmp/ray/session_*/runtime_resources/working_dir_files/_ray_pkg_*`), or in whatever directory
the cluster's job agent runs in without one: a relative local path there is not the path the
user meant, and results written there vanish with the cluster. So there it is an error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.core import split_protocol
from fsspec.implementations.local import LocalFileSystem

from workers.errors import SpecError

if TYPE_CHECKING:
    from jobs.spec import JobSpec

_LOCAL_PROTOCOLS = (None, "file", "local")
#: The spec's fields that hold one path or URL each (the flag is `--` and the name with dashes).
_TOP_PATHS = ("model", "weights", "input", "output", "plan_cache", "plan_key_file")


def is_local(url: str) -> bool:
    """True for a path on this machine's filesystem (no protocol, `file://` or `local://`)."""
    return "::" not in url and split_protocol(url)[0] in _LOCAL_PROTOCOLS


def is_relative(url: str) -> bool:
    """True for a local path that is not absolute (`data/`, `./out`, `file://rel`)."""
    if not is_local(url):
        return False
    return not split_protocol(url)[1].startswith("/")


def canonical_url(url: str) -> str:
    """One spelling per location: local paths absolute, normalized, without a trailing `/`;
    other URLs as fsspec strips them, under the filesystem's first protocol (`s3a://b/k/` ->
    `s3://b/k`). Chained URLs (`simplecache::s3://...`), HTTP(S) URLs and URLs whose stripping
    would drop more than the protocol and a trailing `/` are left as typed."""
    if "::" in url:
        return url
    protocol, _ = split_protocol(url)
    if protocol in _LOCAL_PROTOCOLS:
        return posixpath.normpath(LocalFileSystem._strip_protocol(url))
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError):  # not installed: the job says so when it opens the URL
        return url.rstrip("/") or url
    stripped = cls._strip_protocol(url)
    if "://" in stripped:
        # HTTP(S) keeps the whole URL as its path: there a trailing `/` and the query are part of
        # the address (and a query or `user:password@` may be a credential, which `redact`
        # finds only in the URL as typed).
        return url
    if not url.rstrip("/").endswith(stripped.rstrip("/")):
        # The filesystem drops more than the protocol (an account in `abfs://c@account/...`):
        # the same location may then be spelled otherwise, but never made another one.
        return url
    name = cls.protocol if isinstance(cls.protocol, str) else cls.protocol[0]
    return f"{name}://{stripped.rstrip('/')}"


def job_submission(environ: Mapping[str, str]) -> str | None:
    """The submission id when this process is a `ray job submit` entrypoint (or runs in a job's
    worker), else None."""
    config = environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if config:
        try:
            metadata = json.loads(config).get("metadata") or {}
        except (ValueError, AttributeError):
            metadata = {}
        return str(metadata.get("job_submission_id") or "a job submission")
    return environ.get("RAY_JOB_ID") or None


def check_not_relative(flag: str, url: str, submission: str, cwd: str) -> None:
    """Refuse a relative local path under a job submission, naming the absolute path to pass."""
    if not is_relative(url):
        return
    path = split_protocol(url)[1]
    here = posixpath.normpath(posixpath.join(cwd, path))
    raise SpecError(
        f"{flag} '{url}' is a relative local path, but this job runs under `ray job submit` "
        f"({submission}), in Ray's temporary copy of the working directory, where it would mean "
        f"'{here}' (not your path; files written there are deleted with the cluster); pass an "
        f"absolute path as the cluster's nodes see it, e.g. {flag} \"$PWD/{path}\" expanded by "
        "the shell that runs `ray job submit`, or a URL such as s3://bucket/...")


def _item_paths(spec: JobSpec) -> list[tuple[str, str, str, int, str]]:
    """(flag, url, section, index, field) of every path inside the processing items."""
    found = []
    for section, flag_field in (("preprocess", ("--tokenizer", "tokenizer")),
                                ("postprocess", ("--labels", "labels"))):
        flag, name = flag_field
        for i, item in enumerate(getattr(spec, section)):
            value = getattr(item, name, None)
            if isinstance(value, str) and value:
                found.append((flag, value, section, i, name))
    return found


def resolve_paths(spec: JobSpec, environ: Mapping[str, str] | None = None,
                  cwd: str | None = None) -> JobSpec:
    """The spec with every path in canonical form (see `canonical_url`).

    Under a job submission a relative local path raises SpecError instead (see the module doc).
    """
    environ = os.environ if environ is None else environ
    cwd = os.getcwd() if cwd is None else cwd
    top = [(f"--{name.replace('_', '-')}", name) for name in _TOP_PATHS]
    submission = job_submission(environ)
    if submission is not None:
        for flag, name in top:
            value = getattr(spec, name)
            if value:
                check_not_relative(flag, value, submission, cwd)
        for value in spec.plugins:
            check_not_relative("--plugins", value, submission, cwd)
        for flag, value, *_ in _item_paths(spec):
            check_not_relative(flag, value, submission, cwd)
    changes: dict[str, Any] = {name: canonical_url(getattr(spec, name)) for _, name in top
                               if getattr(spec, name)}
    # Actors read the plugin libraries too, in directories of their own: a relative path
    # would name another file there.
    changes["plugins"] = tuple(canonical_url(value) for value in spec.plugins)
    items: dict[str, list[Any]] = {"preprocess": list(spec.preprocess),
                                   "postprocess": list(spec.postprocess)}
    for _, value, section, i, name in _item_paths(spec):
        items[section][i] = dataclasses.replace(items[section][i], **{name: canonical_url(value)})
    changes.update({k: tuple(v) for k, v in items.items()})
    return dataclasses.replace(spec, **changes)
