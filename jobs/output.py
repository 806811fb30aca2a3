"""The output directory's own files: job identity, committed parts, manifest and success marker.

Also the record of the input a run started from (`_inputs.json`), which tells a rerun what
changed in between: parts of shards that are no longer in the input are stale and removed
before any new part is written, so OUTPUT never holds parts of two versions of a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec

from jobs.lease import LOCK_FILE
from jobs.paths import canonical_url
from workers.commit import TMP_DIR, TMP_PART_RE
from workers.errors import OutputConflictError, StorageError
from workers.redact import redact, redact_json
from workers.storage import filesystem, is_local, is_local_temp_of, retrying, write_bytes_atomic
from workers.types import Shard

JOB_FILE = "_job.json"
MANIFEST_FILE = "_manifest.json"
SUCCESS_FILE = "_SUCCESS"
INPUTS_FILE = "_inputs.json"
#: `part-<position>-<row group>-<id>.parquet`, and the `part-<id>.parquet` of earlier versions.
PART_RE = re.compile(r"^part-(?:\d+-\d+-)?([0-9a-f]{24})\.parquet$")
#: The runner's own small files in OUTPUT; a run removes only their temporary copies.
OWN_FILES = (JOB_FILE, MANIFEST_FILE, SUCCESS_FILE, INPUTS_FILE, LOCK_FILE)
PARQUET_MAGIC = b"PAR1"

#: The fields of a job's identity, in the order a conflict names them (any other field of the
#: identity is named after them).
IDENTITY_FIELDS = ("model_sha256", "input", "bindings", "keep", "precision", "processing",
                   "converted_by")
#: What `_job.json` holds besides the identity: the fingerprint itself, and the model's URI (its
#: bytes' hash is what identifies it).
_NOT_IDENTITY = frozenset({"fingerprint", "model"})


def fingerprint(key: Mapping[str, Any]) -> str:
    """The identity's hash: over every field of `key` (an identity, or a `_job.json`) but the
    fingerprint and the model's URI."""
    fields = {k: v for k, v in key.items() if k not in _NOT_IDENTITY}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def canonical_identity(record: Mapping[str, Any]) -> dict[str, Any]:
    """A `_job.json` as this version writes it: earlier ones stored the input as typed
    (`demo-data/x/`), now it is canonical (`jobs.paths.canonical_url`; a relative input is
    taken relative to this process's directory, and credentials are left out as in
    `PreparedJob.identity`), and the fingerprint follows."""
    out = dict(record)
    for name in ("input", "model"):
        if isinstance(out.get(name), str):
            out[name] = redact(canonical_url(out[name]))
    out["fingerprint"] = fingerprint(out)
    return out


def is_record_of(record: Mapping[str, Any], identity: Mapping[str, Any]) -> bool:
    """Whether `record` (a `_job.json`) is `identity`'s, as written now or by an earlier
    version (`canonical_identity`)."""
    return identity["fingerprint"] in (record.get("fingerprint"),
                                       canonical_identity(record)["fingerprint"])


def _show(name: str, record: Mapping[str, Any]) -> str:
    value = record.get(name)
    if name == "model_sha256":
        return f"sha256 {str(value)[:12]} of '{record.get('model')}'"
    if name == "bindings" and isinstance(value, list):
        return ", ".join(f"{i}={c}" for i, c in value) or "none"
    if name == "input":
        return f"'{value}'"
    if value is None:
        return "none"
    return json.dumps(value, separators=(",", ":")) if not isinstance(value, str) else value


def identity_differences(previous: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """Which identity fields differ, each with both values: `input: '/a' there, '/b' in this job`."""
    names = {"model_sha256": "model", "bindings": "column mapping", "keep": "kept columns"}
    others = sorted((set(previous) | set(current)) - _NOT_IDENTITY - set(IDENTITY_FIELDS))
    return "; ".join(f"{names.get(k, k)}: {_show(k, previous)} there, {_show(k, current)} in "
                     "this job" for k in (*IDENTITY_FIELDS, *others)
                     if previous.get(k) != current.get(k))


@dataclass
class OutputDir:
    """One job's view of OUTPUT: which parts exist and whose they are."""

    url: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    #: Parquet files of other tools that `claim(overwrite=True)` removed (paths under OUTPUT).
    foreign_removed: list[str] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.fs: fsspec.AbstractFileSystem
        self.fs, self.root = filesystem(self.url, self.storage_options)
        self.root = self.root.rstrip("/")
        #: Fingerprints the same job had in records of earlier versions (see `check`).
        self.earlier_fingerprints: set[str] = set()

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def file_url(self, name: str) -> str:
        return str(self.fs.unstrip_protocol(self.path(name)))

    def require_directory(self) -> None:
        """SpecError when OUTPUT is an existing file (it must be a directory, new or not)."""
        from workers.errors import SpecError

        if retrying(f"cannot check output '{self.url}'", lambda: self.fs.isfile(self.root)):
            raise SpecError(f"--output '{self.url}' is a file; --output must be a directory (it "
                            "will hold part-*.parquet, _manifest.json and _SUCCESS): pass the "
                            "path of a new or existing directory")

    def _names(self, path: str) -> list[str]:
        """Names directly under `path` (none if it does not exist), never from a stale cache."""
        def listing() -> list[str]:
            # Parts are written by other processes: never trust this process's listing cache.
            self.fs.invalidate_cache(path)
            try:
                return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False)]
            except FileNotFoundError:
                return []

        return retrying(f"cannot list '{self.fs.unstrip_protocol(path)}'", listing)

    def _parts(self) -> list[tuple[str, str]]:
        """(shard id, part name) of every part in OUTPUT, in name order."""
        return [(m.group(1), name) for name in sorted(self._names(self.root))
                if (m := PART_RE.match(name))]

    def committed(self) -> dict[str, str]:
        """Shard id -> part name for every part in OUTPUT (parts are only ever complete)."""
        return dict(self._parts())

    def align_parts(self, shards: Iterable[Shard]) -> list[tuple[str, str]]:
        """Give every committed part of `shards` its shard's current name; the renames done.

        A part's name holds its file's position in the input, so a file added before others
        moves their parts' names; parts of earlier versions are named by id alone. Renaming is
        atomic on local disks; on object stores it is a copy and a delete, and a run
        interrupted in between leaves two names of the same bytes: the one that is not the
        shard's name is removed here.
        """
        wanted = {s.id: s.part_name for s in shards}
        names: dict[str, list[str]] = defaultdict(list)
        for sid, name in self._parts():
            names[sid].append(name)
        renamed = []
        for sid, found in names.items():
            target = wanted.get(sid)
            if target is None or found == [target]:
                continue  # not a shard of this input (stale: removed elsewhere), or in place
            others = [n for n in found if n != target]
            if target not in found:
                source = others.pop(0)
                self._move(source, target)
                renamed.append((source, target))
            self.remove(others)
        return renamed

    def foreign_parquet(self) -> list[str]:
        """Parquet files under OUTPUT (by path below it) that this runner did not write.

        Only those a reader of OUTPUT would read: names starting `_` or `.` are skipped by
        Parquet readers, and by this check. A file is Parquet by its `.parquet` name or, for
        names without it (Hive's `000000_0`), by its leading magic bytes.
        """
        def find() -> list[str]:
            self.fs.invalidate_cache(self.root)
            try:
                return [str(p) for p in self.fs.find(self.root)]
            except FileNotFoundError:
                return []

        paths = retrying(f"cannot list output '{self.url}'", find)
        found = []
        for path in paths:
            relative = path[len(self.root):].lstrip("/")
            parts = relative.split("/")
            if not relative or any(p.startswith(("_", ".")) for p in parts):
                continue
            if len(parts) == 1 and PART_RE.match(relative):
                continue  # a part of this runner (whose job it is, check() decides)
            if relative.lower().endswith(".parquet") or self._has_parquet_magic(path):
                found.append(relative)
        return sorted(found)

    def _has_parquet_magic(self, path: str) -> bool:
        def head() -> bytes:
            with self.fs.open(path, "rb") as f:
                return bytes(f.read(len(PARQUET_MAGIC)))

        return retrying(f"cannot read '{self.fs.unstrip_protocol(path)}'", head) == PARQUET_MAGIC

    def has_part(self, shard: Shard) -> bool:
        """Whether the shard's part is in OUTPUT (False when storage cannot tell)."""
        try:
            return bool(retrying(f"cannot check '{self.file_url(shard.part_name)}'",
                                 lambda: self.fs.exists(self.path(shard.part_name))))
        except StorageError:
            return False

    def _move(self, source: str, target: str) -> None:
        paths = self.path(source), self.path(target)
        retrying(f"cannot rename '{self.file_url(source)}' to '{target}'",
                 lambda: self.fs.mv(*paths))

    def read_json(self, name: str) -> dict[str, Any] | None:
        def read() -> bytes | None:
            try:
                return bytes(self.fs.cat_file(self.path(name)))
            except FileNotFoundError:
                return None

        data = retrying(f"cannot read '{self.file_url(name)}'", read)
        if data is None:
            return None
        try:
            value = json.loads(data)
        except json.JSONDecodeError as exc:
            raise StorageError(f"'{self.file_url(name)}' is not valid JSON ({exc}); "
                               "it was not written by this runner: remove it or pass --overwrite"
                               ) from exc
        return value if isinstance(value, dict) else None

    def write_json(self, name: str, value: Mapping[str, Any]) -> None:
        """Write one of the runner's files; no URI in it keeps its credentials (OUTPUT is often
        shared more widely than the job's inputs)."""
        data = json.dumps(redact_json(json.loads(json.dumps(value, default=str))), indent=2,
                          sort_keys=False).encode()
        write_bytes_atomic(self.file_url(name), data, self.storage_options)

    def remove(self, names: list[str]) -> None:
        for name in names:
            def rm(path: str = self.path(name)) -> None:
                if self.fs.exists(path):
                    self.fs.rm(path)

            retrying(f"cannot remove '{self.file_url(name)}'", rm)

    def clear_tmp(self) -> None:
        """Remove the temporary files an interrupted run left, by their names; nothing else.

        Parts being written live in `OUTPUT/_tmp/part-<id>.parquet.<uuid>`, the runner's small
        files in `OUTPUT/.<name>.<uuid>.tmp`; other files (in `_tmp` or not) are the user's.
        """
        tmp = self.path(TMP_DIR)
        for name in self._names(tmp):
            if TMP_PART_RE.match(name):
                self._remove_path(f"{tmp}/{name}")
        if is_local(self.fs) and self.fs.isdir(tmp) and not self._names(tmp):
            self.fs.rmdir(tmp)  # object stores have no directories to remove
        for name in self._names(self.root):
            if any(is_local_temp_of(own, name) for own in OWN_FILES):
                self._remove_path(self.path(name))

    def _remove_path(self, path: str) -> None:
        def rm() -> None:
            with contextlib.suppress(FileNotFoundError):  # removed by another run in between
                self.fs.rm_file(path)

        retrying(f"cannot remove '{self.fs.unstrip_protocol(path)}'", rm)

    def check(self, identity: Mapping[str, Any], overwrite: bool) -> dict[str, str]:
        """Parts of an earlier run of this job; refuses another job's parts unless `overwrite`.

        Read-only, so the driver can call it before it starts Ray.
        """
        foreign = self.foreign_parquet()
        if foreign and not overwrite:
            listing = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more"
                                                if len(foreign) > 5 else "")
            raise OutputConflictError(
                f"output '{self.url}' holds {len(foreign)} Parquet file(s) this runner did not "
                f"write ({listing}); a reader of the output would read them with the job's "
                "parts: choose another --output, or pass --overwrite to remove them")
        parts = self.committed()
        previous = self.read_json(JOB_FILE)
        same = previous is not None and is_record_of(previous, identity)
        if previous is not None and previous.get("fingerprint") != identity["fingerprint"]:
            # Written by an earlier version, with the input as it was typed?
            if same:
                self.earlier_fingerprints.add(str(previous.get("fingerprint")))
            previous = canonical_identity(previous)
        if parts and not same:
            if not overwrite:
                whose = (identity_differences(previous, identity) if previous
                         else f"no {JOB_FILE}: not written by this runner")
                raise OutputConflictError(
                    f"output '{self.url}' already holds {len(parts)} part(s) of another job "
                    f"({whose}); choose another --output, or pass --overwrite to replace them"
                )
            return {}
        return parts

    def claim(self, identity: Mapping[str, Any], overwrite: bool) -> dict[str, str]:
        """Make OUTPUT this job's; return the parts already committed by an earlier run of it.

        Refuses (OutputConflictError) when OUTPUT holds parts of a different job, or Parquet
        files this runner did not write, unless `overwrite`, which removes them first.
        """
        parts = self.check(identity, overwrite)
        foreign = self.foreign_parquet() if overwrite else []
        for relative in foreign:
            self._remove_path(self.path(relative))
        self.foreign_removed = foreign
        if not parts:
            others = self.committed()
            if others:  # another job's, and overwrite was given
                self.remove([*others.values(), MANIFEST_FILE, SUCCESS_FILE, INPUTS_FILE])
        self.remove([SUCCESS_FILE])
        self.write_json(JOB_FILE, identity)
        return parts


def inputs_record(fingerprint: str, files: Iterable[tuple[str, int, str]],
                  shards: Iterable[Shard]) -> dict[str, Any]:
    """What `_inputs.json` holds: each input file's size and version, and its shards' ids."""
    record: dict[str, dict[str, Any]] = {
        url: {"size": size, "version": version, "shards": []} for url, size, version in files}
    for shard in shards:
        # A shard of image files covers many files; a Parquet shard covers part of one.
        for url, size, version in ([(f.url, f.size, f.version) for f in getattr(shard, "files", ())]
                                   or [(shard.url, shard.size, shard.version)]):
            entry = record.setdefault(url, {"size": size, "version": version, "shards": []})
            if shard.id not in entry["shards"]:
                entry["shards"].append(shard.id)
    return {"job": fingerprint, "files": record}


@dataclass
class InputChanges:
    """How the input differs from the one the previous run of this job started from."""

    known: bool  # False when there is no record of the previous run's input
    added: list[str] = field(default_factory=list)
    rewritten: list[dict[str, Any]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    #: Committed parts of shards that are not in the current input: {part, file, reason}.
    stale: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.rewritten or self.removed or self.stale)

    def summary(self) -> str:
        words = [f"{len(v)} file(s) {k}" for k, v in
                 (("added", self.added), ("rewritten", self.rewritten), ("removed", self.removed))
                 if v]
        if self.stale:
            words.append(f"{len(self.stale)} stale part(s) removed")
        return ", ".join(words)

    def to_json(self) -> dict[str, Any]:
        return {"previous_run_recorded": self.known, "added": self.added,
                "rewritten": self.rewritten, "removed": self.removed}


def diff_inputs(previous: Mapping[str, Any] | None, current: Mapping[str, Any],
                committed: Mapping[str, str], earlier: Iterable[str] = ()) -> InputChanges:
    """Compare the previous run's input record with the current one; find stale parts.

    A part is stale when its shard id is not one of the current input's shards: shard ids
    cover the file's path, size, version and row groups, so a rewritten file's old parts are.
    `earlier`: fingerprints the same job had in an earlier version's records.
    """
    same_job = previous is not None and (previous.get("job") == current.get("job")
                                         or previous.get("job") in set(earlier))
    before: Mapping[str, Any] = previous.get("files", {}) if previous and same_job else {}
    now: Mapping[str, Any] = current["files"]
    changes = InputChanges(known=bool(same_job))
    if same_job:
        changes.added = sorted(u for u in now if u not in before)
        changes.removed = sorted(u for u in before if u not in now)
        changes.rewritten = [
            {"file": u, "before": {"size": before[u]["size"], "version": before[u]["version"]},
             "after": {"size": now[u]["size"], "version": now[u]["version"]}}
            for u in sorted(now) if u in before and
            (before[u]["size"], before[u]["version"]) != (now[u]["size"], now[u]["version"])]
    owner = {sid: url for url, f in before.items() for sid in f.get("shards", [])}
    current_ids = {sid for f in now.values() for sid in f["shards"]}
    rewritten = {r["file"] for r in changes.rewritten}
    for sid, name in sorted(committed.items()):
        if sid in current_ids:
            continue
        url = owner.get(sid)
        if url is None:
            reason = "not a shard of the current input (no record of which file it came from)"
        elif url in rewritten:
            reason = "its file was rewritten"
        elif url not in now:
            reason = "its file is no longer in the input"
        else:
            reason = "its file was cut into different shards (rows_per_shard changed?)"
        changes.stale.append({"part": name, "file": url, "reason": reason})
    return changes
