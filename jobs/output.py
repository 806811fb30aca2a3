"""The output directory's own files: job identity, committed parts, manifest and success marker."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec

from workers.commit import TMP_DIR
from workers.errors import OutputConflictError, StorageError
from workers.storage import filesystem, storage_errors, write_bytes_atomic

JOB_FILE = "_job.json"
MANIFEST_FILE = "_manifest.json"
SUCCESS_FILE = "_SUCCESS"
PART_RE = re.compile(r"^part-([0-9a-f]{24})\.parquet$")


@dataclass
class OutputDir:
    """One job's view of OUTPUT: which parts exist and whose they are."""

    url: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fs: fsspec.AbstractFileSystem
        self.fs, self.root = filesystem(self.url, self.storage_options)
        self.root = self.root.rstrip("/")

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def file_url(self, name: str) -> str:
        return str(self.fs.unstrip_protocol(self.path(name)))

    def committed(self) -> dict[str, str]:
        """Shard id -> part name for every part in OUTPUT (parts are only ever complete)."""
        with storage_errors(f"cannot list output '{self.url}'"):
            # Parts are written by other processes: never trust this process's listing cache.
            self.fs.invalidate_cache(self.root)
            try:
                names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
            except FileNotFoundError:
                return {}
        return {m.group(1): name for name in names if (m := PART_RE.match(name))}

    def read_json(self, name: str) -> dict[str, Any] | None:
        with storage_errors(f"cannot read '{self.file_url(name)}'"):
            try:
                data = self.fs.cat_file(self.path(name))
            except FileNotFoundError:
                return None
        try:
            value = json.loads(data)
        except json.JSONDecodeError as exc:
            raise StorageError(f"'{self.file_url(name)}' is not valid JSON ({exc}); "
                               "it was not written by this runner: remove it or pass --overwrite"
                               ) from exc
        return value if isinstance(value, dict) else None

    def write_json(self, name: str, value: Mapping[str, Any]) -> None:
        data = json.dumps(value, indent=2, sort_keys=False, default=str).encode()
        write_bytes_atomic(self.file_url(name), data, self.storage_options)

    def remove(self, names: list[str]) -> None:
        with storage_errors(f"cannot remove files in output '{self.url}'"):
            for name in names:
                if self.fs.exists(self.path(name)):
                    self.fs.rm(self.path(name))

    def clear_tmp(self) -> None:
        """Drop temporary files an interrupted run left (never visible as parts)."""
        with storage_errors(f"cannot clean '{self.file_url(TMP_DIR)}'"):
            if self.fs.exists(self.path(TMP_DIR)):
                self.fs.rm(self.path(TMP_DIR), recursive=True)

    def check(self, identity: Mapping[str, Any], overwrite: bool) -> dict[str, str]:
        """Parts of an earlier run of this job; refuses another job's parts unless `overwrite`.

        Read-only, so the driver can call it before it starts Ray.
        """
        parts = self.committed()
        previous = self.read_json(JOB_FILE)
        same = previous is not None and previous.get("fingerprint") == identity["fingerprint"]
        if parts and not same:
            if not overwrite:
                whose = (f"model {previous.get('model')}, input {previous.get('input')}"
                         if previous else f"no {JOB_FILE}: not written by this runner")
                raise OutputConflictError(
                    f"output '{self.url}' already holds {len(parts)} part(s) of another job "
                    f"({whose}); choose another --output, or pass --overwrite to replace them"
                )
            return {}
        return parts

    def claim(self, identity: Mapping[str, Any], overwrite: bool) -> dict[str, str]:
        """Make OUTPUT this job's; return the parts already committed by an earlier run of it.

        Refuses (OutputConflictError) when OUTPUT holds parts of a different job, unless
        `overwrite`, which removes them first.
        """
        parts = self.check(identity, overwrite)
        if not parts:
            others = self.committed()
            if others:  # another job's, and overwrite was given
                self.remove([*others.values(), MANIFEST_FILE, SUCCESS_FILE])
        self.remove([SUCCESS_FILE])
        self.write_json(JOB_FILE, identity)
        return parts
