"""Values that cross from the driver to actors and back: shards, worker config, shard results."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from workers.backends.base import BackendConfig
from workers.sched import HELPER_NICE, IMAGE_TABLES, SWITCH_INTERVAL_MS

if TYPE_CHECKING:
    from workers.postprocess import PostSpec
    from workers.preprocess import PrepSpec

#: What one row group may decode to, by default (`--max-row-group-bytes`): a reader thread holds
#: one decoded row group (and a GPU actor `--readers` plus those read ahead), so this bounds an
#: actor's memory whatever a file's few bytes claim. Row groups of 384 RGB 224x224 float32
#: images are 231 MB.
DEFAULT_MAX_ROW_GROUP_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class FileRef:
    """One input file of a files shard (an image directory): one row per file."""

    url: str
    size: int
    version: str


@dataclass(frozen=True)
class Shard:
    """A row-group range `[start, stop)` of one Parquet file, identified by content, not position.

    A files shard (`files` non-empty: a group of image files, one row each) has `url` set to
    its first file, `size` to the files' total bytes and `row_groups` to `(0, len(files))`.

    `position` is the file's place in the input's sorted listing (a files shard's: its first
    file's); it names the part, so parts sort in input order, but is not part of the id: a
    file added before this one moves its position, not its identity.
    """

    url: str
    size: int
    version: str
    row_groups: tuple[int, int]
    rows: int
    files: tuple[FileRef, ...] = ()
    position: int = 0

    @property
    def id(self) -> str:
        """Stable id from the file's path, size, version and row-group range (or its files')."""
        if self.files:
            key = json.dumps(["files", [[f.url, f.size, f.version] for f in self.files]])
        else:
            key = json.dumps([self.url, self.size, self.version, list(self.row_groups)])
        return hashlib.sha256(key.encode()).hexdigest()[:24]

    @property
    def part_name(self) -> str:
        """The output file this shard commits to; deterministic, so retries overwrite.

        `part-<position>-<first row group>-<id>.parquet`, both numbers zero-padded to 6 digits:
        a listing of the output sorts in input order (file, then row group).
        """
        return f"part-{self.position:06d}-{self.row_groups[0]:06d}-{self.id}.parquet"

    def describe(self) -> str:
        if self.files:
            return f"{len(self.files)} file(s) {self.files[0].url} .. {self.files[-1].url}"
        start, stop = self.row_groups
        return f"{self.url} row groups {start}-{stop - 1}"

    def to_json(self) -> dict[str, Any]:
        if self.files:
            # The part's path column lists every file; the manifest names the range.
            return {"id": self.id, "url": self.url, "last": self.files[-1].url,
                    "files": len(self.files), "size": self.size, "rows": self.rows,
                    "position": self.position}
        out = {"id": self.id, **asdict(self), "row_groups": list(self.row_groups)}
        out.pop("files")
        return out


@dataclass(frozen=True)
class WorkerConfig:
    """Everything an actor needs to process shards; built and validated by the driver."""

    backend: str
    backend_config: BackendConfig
    output_url: str
    bindings: tuple[tuple[str, str], ...]  # (model input, column)
    keep: tuple[str, ...] = ()
    batch_size: int = 256
    storage_options: tuple[tuple[str, Any], ...] = ()
    prefetch: int = 2
    #: Batches in flight on the GPU (each with its own stream and buffers); GPU backends only.
    slots: int = 3
    #: Resolved preprocessors feeding every model input; empty: `bindings` as tensor columns.
    preprocess: tuple[PrepSpec, ...] = ()
    #: Resolved postprocessors making the output columns; empty: every output as is (`raw`).
    postprocess: tuple[PostSpec, ...] = ()
    #: Threads that decode images and tokenize text within one actor.
    preprocess_threads: int = 1
    #: Threads decoding row groups in parallel on the GPU path (the CPU path reads on one).
    readers: int = 4
    #: GPU path: batches executing at once (`workers.pipeline.SlotPool`); the rest of the
    #: `slots` wait with their inputs copied in.
    concurrent_batches: int = 2
    #: What one row group may decode to (`workers.reader.row_group_bytes`); larger ones fail.
    max_row_group_bytes: int = DEFAULT_MAX_ROW_GROUP_BYTES
    #: Text: most padded tokens (rows x width) a batch holds (None: `batching.TOKENS_PER_ROW`
    #: per row of `batch_size`), and rows sorted by length together (None: see `batching`).
    max_batch_tokens: int | None = None
    sort_window: int | None = None
    #: The actor's GIL switch interval, and how much lower (nice) its decoding and tokenizing
    #: threads and processes run (`workers.sched`).
    switch_interval_ms: float = SWITCH_INTERVAL_MS
    helper_nice: int = HELPER_NICE
    #: Batches of images the decoding threads work on at once (`workers.sched.IMAGE_TABLES`).
    image_tables: int = IMAGE_TABLES
    #: Image inputs (`--image-decode auto`) whose sampled rows are JPEGs at the model's size:
    #: GPU actors with CPUs enough decode them on the CPU (`workers.gpuimages.open_gpu_images`).
    at_size_images: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError(f"WorkerConfig.slots must be >= 1 (batches in flight), got {self.slots}")
        if self.concurrent_batches < 1:
            raise ValueError(f"WorkerConfig.concurrent_batches must be >= 1, "
                             f"got {self.concurrent_batches}")
        if self.readers < 1:
            raise ValueError(f"WorkerConfig.readers must be >= 1 (reading threads), "
                             f"got {self.readers}")

    @property
    def columns(self) -> list[str]:
        """Input columns to read, in a stable order, each once."""
        seen: dict[str, None] = {}
        for _, column in self.bindings:
            seen[column] = None
        for spec in self.preprocess:
            seen.update(dict.fromkeys(spec.columns))
        for column in self.keep:
            seen[column] = None
        return list(seen)

    @property
    def storage(self) -> dict[str, Any]:
        return dict(self.storage_options)


#: StageTimes fields only the GPU path (device slots) measures.
GPU_STAGES = frozenset({"h2d", "compute", "d2h", "gpu_busy", "first_batch", "submit"})


@dataclass
class StageTimes:
    """Seconds spent per pipeline stage in one shard (or summed over many)."""

    read: float = 0.0
    convert: float = 0.0
    infer: float = 0.0
    write: float = 0.0
    commit: float = 0.0
    total: float = 0.0
    # GPU path only, from CUDA events: summed copy-in, execution and copy-out time of every
    # batch (a batch's execution counts from its copy-in's end, so it includes waiting for the
    # batches before it), and `gpu_busy`, the time at least one batch was executing (overlaps
    # counted once).
    h2d: float = 0.0
    compute: float = 0.0
    d2h: float = 0.0
    gpu_busy: float = 0.0
    #: GPU path: seconds from the shard's start until its first batch was submitted (the time
    #: the GPU waits for the first row group to be read and converted).
    first_batch: float = 0.0
    #: GPU path: host seconds spent enqueuing batches (copies, the model's kernels, events);
    #: part of `infer`, which also counts waiting for batches to finish.
    submit: float = 0.0

    def add(self, other: StageTimes) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def to_json(self, gpu: bool) -> dict[str, float]:
        """The stages' seconds; the GPU path's own (copies, execution, submit) only if `gpu`."""
        return {k: v for k, v in asdict(self).items() if gpu or k not in GPU_STAGES}

    @property
    def gpu_busy_fraction(self) -> float:
        """Share of the wall time the GPU was executing the model (0 on the CPU path)."""
        return self.gpu_busy / self.total if self.total > 0 else 0.0


@dataclass
class ShardResult:
    """What an actor reports for a committed shard."""

    shard_id: str
    rows: int
    part_url: str
    part_bytes: int
    batches: int
    worker: str
    times: StageTimes = field(default_factory=StageTimes)
    #: Rows left out of the part because preprocessing failed them (on_error: skip).
    rows_failed: int = 0
    #: The first of those rows: shard row, kept columns' values, column and reason.
    row_failures: list[dict[str, Any]] = field(default_factory=list)
    #: Wall-clock seconds (`time.time()`) when the actor started the shard and committed its
    #: part: the job's rows/s between its first shard and its last commit come from these.
    started_at: float = 0.0
    committed_at: float = 0.0
