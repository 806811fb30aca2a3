"""Listing input files, reading their footers (never their data), cutting row-group shards."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from workers.errors import SpecError, StorageError
from workers.images import is_image_name
from workers.storage import file_version, filesystem, retrying, storage_errors
from workers.types import FileRef, Shard


@dataclass(frozen=True)
class InputFile:
    """One Parquet file as its footer describes it."""

    url: str
    size: int
    version: str
    schema: pa.Schema
    row_group_rows: tuple[int, ...]

    @property
    def rows(self) -> int:
        return sum(self.row_group_rows)


@dataclass(frozen=True)
class BadFile:
    """An input file that cannot be sharded, and why."""

    url: str
    reason: str


def _hidden(path: str) -> bool:
    return any(part.startswith(("_", ".")) for part in path.split("/") if part)


def list_input(url: str, storage_options: Mapping[str, Any] | None = None
               ) -> tuple[fsspec.AbstractFileSystem, dict[str, dict[str, Any]]]:
    """Files under a file, directory or glob URL (hidden `_`/`.` names skipped), with their info."""
    fs, path = filesystem(url, storage_options)
    with storage_errors(f"cannot list input '{url}'"):
        fs.invalidate_cache()  # files may have changed since this process last listed them
        if fs.isfile(path):
            return fs, {path: fs.info(path)}
        if any(ch in path for ch in "*?["):
            found = fs.glob(path, detail=True)
        elif fs.isdir(path):
            found = fs.find(path, detail=True)
        else:
            raise SpecError(f"input '{url}' does not exist; check --input (a Parquet file, "
                            "a directory or a glob)")
    root = path.rstrip("/") if not any(ch in path for ch in "*?[") else ""
    files = {p: info for p, info in sorted(found.items())
             if info.get("type", "file") == "file"
             and not _hidden(p[len(root):] if root and p.startswith(root) else posixpath.basename(p))}
    if not files:
        raise SpecError(f"input '{url}' holds no files; check --input (hidden names starting "
                        "with '_' or '.' are skipped)")
    return fs, files


_TAIL = 64 * 1024  # one ranged read usually holds the whole footer


def read_footer(fs: fsspec.AbstractFileSystem, path: str, info: Mapping[str, Any]
                ) -> InputFile | BadFile:
    """Read one file's footer; a file that is not Parquet becomes a BadFile, not an exception.

    The footer's bytes are fetched through fsspec (so storage failures raise StorageError) and
    parsed from memory (so a parse failure can only mean the file is bad: pyarrow reports both
    as OSError).
    """
    url = fs.unstrip_protocol(path)
    size = int(info.get("size") or 0)
    if size < 12:
        return BadFile(url, f"not a readable Parquet file ({size} bytes, too small)")
    try:
        with storage_errors(f"cannot read the footer of '{url}'"):
            tail = retrying(f"cannot read the footer of '{url}'",
                            lambda: fs.cat_file(path, start=max(0, size - _TAIL), end=size))
            if tail[-4:] != b"PAR1":
                return BadFile(url, "not a readable Parquet file (no PAR1 magic at its end)")
            length = int.from_bytes(tail[-8:-4], "little") + 8
            if length > size - 4:
                return BadFile(url, f"not a readable Parquet file (footer of {length} bytes in a "
                               f"{size}-byte file)")
            if length > len(tail):
                tail = retrying(f"cannot read the footer of '{url}'",
                                lambda: fs.cat_file(path, start=size - length, end=size))
    except StorageError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            return BadFile(url, "deleted while the job was listing its input")
        raise
    try:
        meta = pq.read_metadata(pa.BufferReader(b"PAR1" + tail[-length:]))
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError, ValueError) as exc:
        return BadFile(url, f"not a readable Parquet file ({exc})")
    rows = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    return InputFile(url=url, size=size, version=file_version(info), schema=schema,
                     row_group_rows=rows)


def read_footers(fs: fsspec.AbstractFileSystem, files: Mapping[str, Mapping[str, Any]],
                 threads: int = 16) -> list[InputFile | BadFile]:
    """Footers of many files, read concurrently (object-store latency dominates), in path order."""
    with ThreadPoolExecutor(max(1, min(threads, len(files)))) as pool:
        return list(pool.map(lambda item: read_footer(fs, *item), files.items()))


#: Balanced shards: each worker gets at least this many, so none sits idle while the last
#: shards finish; and none larger than `MAX_SHARD_ROWS` rows (a retry redoes a whole shard).
SHARDS_PER_WORKER = 4
MAX_SHARD_ROWS = 100_000


def cut_shards(files: list[InputFile], rows_per_shard: int, at_most: bool = False
               ) -> list[Shard]:
    """Cut each file into runs of whole row groups of about `rows_per_shard` rows (empty ones skipped).

    A shard takes row groups until it holds `rows_per_shard` rows, or, `at_most`, while it
    holds no more than that (a row group larger than that is a shard of its own).
    """
    shards: list[Shard] = []
    for f in files:
        start, rows = 0, 0
        groups = f.row_group_rows
        for i, n in enumerate(groups):
            rows += n
            last = i == len(groups) - 1
            full = (rows + groups[i + 1] > rows_per_shard if at_most and not last
                    else rows >= rows_per_shard)
            if full or last:
                if rows:
                    shards.append(Shard(url=f.url, size=f.size, version=f.version,
                                        row_groups=(start, i + 1), rows=rows))
                start, rows = i + 1, 0
    return shards


def balanced_rows(files: list[InputFile], workers: int) -> int:
    """Rows per shard that give each of `workers` at least `SHARDS_PER_WORKER` shards."""
    total = sum(f.rows for f in files)
    return max(1, min(MAX_SHARD_ROWS, total // (SHARDS_PER_WORKER * max(1, workers))))


def balanced_shards(files: list[InputFile], workers: int, rows: int | None = None
                    ) -> tuple[list[Shard], list[tuple[str, int]]]:
    """Shards of at most `rows` rows (default `balanced_rows`), and the files whose row groups
    are larger than that: (url, its largest row group's rows). A row group is never split, so
    such a file's big row groups each run on one worker."""
    rows = rows or balanced_rows(files, workers)
    big = [(f.url, max(f.row_group_rows)) for f in files
           if f.row_group_rows and max(f.row_group_rows) > rows]
    return cut_shards(files, rows, at_most=True), big


_PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")


def is_image_listing(files: Mapping[str, Any]) -> bool:
    """True when a listing looks like an image directory: image files and no Parquet file."""
    names = [p.lower() for p in files]
    return (any(is_image_name(p) for p in names)
            and not any(p.endswith(_PARQUET_SUFFIXES) for p in names))


def list_image_files(fs: fsspec.AbstractFileSystem, files: Mapping[str, Mapping[str, Any]]
                     ) -> tuple[list[FileRef], list[str]]:
    """The image files of a listing in path order, and the URLs of the other files (skipped)."""
    images, others = [], []
    for path, info in files.items():
        url = fs.unstrip_protocol(path)
        if is_image_name(path):
            images.append(FileRef(url=url, size=int(info.get("size") or 0),
                                  version=file_version(info)))
        else:
            others.append(url)
    return images, others


def cut_file_shards(files: list[FileRef], files_per_shard: int) -> list[Shard]:
    """Group files (in path order) into shards of `files_per_shard` files, one row per file.

    A shard's id comes from its files' paths, sizes and versions, so an unchanged directory
    always gives the same shards.
    """
    shards: list[Shard] = []
    for start in range(0, len(files), files_per_shard):
        group = tuple(files[start:start + files_per_shard])
        shards.append(Shard(url=group[0].url, size=sum(f.size for f in group), version="",
                            row_groups=(0, len(group)), rows=len(group), files=group))
    return shards
