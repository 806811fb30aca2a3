"""Batching: converted pieces of a shard regrouped into the batches the engine runs.

Two ways: `exact_batches` (fixed-size rows: batches of exactly `batch_size` rows, in order)
and `length_batches` (text: within a window of the shard, rows sorted by token count and cut
to a token budget, each batch padded only to its own longest row). Sorted batches carry each
row's place in the shard (`ORDER`), and `InputOrder` puts their outputs back in input order
before they are written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from workers.errors import BackendError, DataError
from workers.outputs import CARRY_PREFIX, carry_inputs
from workers.rowgroups import Piece
from workers.tensors import TensorMeta
from workers.text import TOKEN_COUNTS

if TYPE_CHECKING:
    from workers.types import WorkerConfig

#: Kept column of sorted batches: each row's index among the shard's rows (dropped on write).
ORDER = "__row__"
#: Default token budget per batch, per row of `--batch-size` (a batch of the full row count
#: holds rows of up to this many tokens; longer rows make batches of fewer rows).
TOKENS_PER_ROW = 64
#: Default rows sorted together: this many batches of `--batch-size`, and at least `MIN_WINDOW`.
WINDOW_BATCHES = 16
MIN_WINDOW = 8192
#: Batch widths on GPUs are rounded up to a multiple of this: tensor cores work in multiples of
#: 8, and fewer distinct shapes mean fewer plans for ONNX Runtime and TensorRT to pick kernels
#: for. On CPUs each padded token is work and nothing is gained: widths stay exact there.
WIDTH_MULTIPLE = 8

Shapes = dict[str, tuple[int, ...]]


def exact_batches(pieces: Iterator[Piece], batch_size: int) -> Iterator[list[Piece]]:
    """Regroup row groups into batches of exactly `batch_size` rows (the last may be shorter).

    A batch is a list of pieces (views, no copies) that together hold its rows, in order; a
    batch that spans a row-group boundary has more than one.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch: list[Piece] = []
    have = 0
    for feeds, kept in pieces:
        rows, start = kept.num_rows, 0
        while start < rows:
            take = min(batch_size - have, rows - start)
            batch.append(({name: array[start:start + take] for name, array in feeds.items()},
                          kept.slice(start, take)))
            have += take
            start += take
            if have == batch_size:
                yield batch
                batch, have = [], 0
    if batch:
        yield batch


@dataclass(frozen=True)
class TokenBudget:
    """How text batches are cut: at most `rows` rows and `tokens` padded tokens (rows x width).

    A batch's width is its longest row rounded up to `multiple` (`WIDTH_MULTIPLE` on GPUs,
    1 on CPUs), never past `max_length`. `inputs` are the token inputs (their second axis is
    the width); rows are sorted within windows of `window` rows, so memory stays bounded
    however long the shard.
    A single row wider than the budget still makes a batch of its own.
    """

    rows: int
    tokens: int
    window: int
    max_length: int
    inputs: tuple[str, ...]
    multiple: int = WIDTH_MULTIPLE

    def __post_init__(self) -> None:
        for name in ("rows", "tokens", "window", "max_length", "multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"TokenBudget.{name} must be >= 1, got {getattr(self, name)}")

    def width(self, longest: int) -> int:
        """The width of a batch whose longest row has `longest` tokens."""
        rounded = -(-max(1, longest) // self.multiple) * self.multiple
        return max(1, min(rounded, self.max_length))

    def rows_at(self, width: int) -> int:
        """The most rows a batch of `width` holds."""
        return max(1, min(self.rows, self.tokens // width))

    def cut(self, lengths: np.ndarray) -> list[tuple[int, int]]:
        """`[start, stop)` of each batch over rows already sorted by `lengths`, ascending."""
        bounds: list[tuple[int, int]] = []
        start = 0
        widths = [self.width(int(n)) for n in lengths]
        for i, width in enumerate(widths):
            count = i - start + 1
            # Sorted ascending, so the newest row sets the width of the batch it joins.
            if count > 1 and (count > self.rows or count * width > self.tokens):
                bounds.append((start, i))
                start = i
        if start < len(widths):
            bounds.append((start, len(widths)))
        return bounds

    def largest(self) -> list[tuple[int, int]]:
        """Every (rows, width) a full batch can have; any batch fits one of them.

        Device slots are sized for the largest of each tensor over these, so they hold every
        batch whatever its outputs' shapes make of rows and width.
        """
        widths = {*range(self.multiple, self.max_length + 1, self.multiple), self.max_length}
        return [(self.rows_at(w), w) for w in sorted(widths)]

    def warm_up(self) -> list[tuple[int, int]]:
        """The batches that warm a slot up: the widest, and the one of the most tokens."""
        shapes = self.largest()
        most = max(shapes, key=lambda s: (s[0] * s[1], s[1]))
        return sorted({shapes[-1], most})

    def profiles(self, lengths: np.ndarray, most: int = 3
                 ) -> tuple[tuple[tuple[int, int, int], ...], tuple[tuple[int, int, int], ...]]:
        """TensorRT optimization profiles for these batches: (rows, widths) (min, opt, max) each.

        Widths are split at the sample's median and 90th percentile (as batch widths), up to
        `max_length`, so each profile is tuned (opt) for the batches it will mostly see: its
        rows' median width and the rows the budget gives that width. A batch of width w in
        (lo, hi] has at most `rows_at` of the narrowest width above lo rows: the profile's max.
        """
        sample = np.asarray(lengths) if len(lengths) else np.array([self.max_length])
        widths = np.array([self.width(int(n)) for n in sample])
        edges = sorted({int(np.percentile(widths, q)) for q in (50, 90)} | {self.max_length})
        rows: list[tuple[int, int, int]] = []
        spans: list[tuple[int, int, int]] = []
        low = 0
        for high in edges[-most:] if len(edges) > most else edges:
            inside = widths[(widths > low) & (widths <= high)]
            best = self.width(int(np.median(inside))) if inside.size else high
            narrowest = self.width(low + 1)
            spans.append((low + 1, min(max(best, low + 1), high), high))
            rows.append((1, self.rows_at(best), self.rows_at(narrowest)))
            low = high
        return tuple(rows), tuple(spans)

    def shapes(self, metas: Sequence[TensorMeta],
               batches: Sequence[tuple[int, int]] | None = None) -> list[Shapes]:
        """Every model input's shape in each of `batches` (default: the `largest`)."""
        out = []
        for rows, width in (self.largest() if batches is None else batches):
            shapes: Shapes = {}
            for meta in metas:
                if meta.name in self.inputs:
                    shapes[meta.name] = (rows, width)
                elif meta.row_size is None:
                    raise BackendError(f"input '{meta.name}' is {meta.describe()}: only token "
                                       "inputs may have a dynamic width on device slots")
                else:
                    shapes[meta.name] = (rows, *(int(d) for d in meta.row_shape if d is not None))
            out.append(shapes)
        return out


def token_budget(config: WorkerConfig, metas: Sequence[TensorMeta], gpu: bool = True
                 ) -> TokenBudget | None:
    """The job's text batching, or None when no input's width follows its rows; `gpu`: for
    device slots (widths rounded to `WIDTH_MULTIPLE`), else for a CPU engine (exact widths)."""
    from workers.preprocess import TextPrep

    by_name = {m.name: m for m in metas}
    texts = [(spec, width) for spec in config.preprocess if isinstance(spec, TextPrep)
             if (width := spec.token_width(by_name)) is not None]
    if not texts:
        return None
    window = config.sort_window or max(MIN_WINDOW, WINDOW_BATCHES * config.batch_size)
    return TokenBudget(rows=config.batch_size,
                       tokens=config.max_batch_tokens or TOKENS_PER_ROW * config.batch_size,
                       window=window, max_length=max(width for _, width in texts),
                       inputs=tuple(n for spec, _ in texts for n in spec.inputs),
                       multiple=WIDTH_MULTIPLE if gpu else 1)


def _join(window: list[Piece], budget: TokenBudget, pads: Mapping[str, int]
          ) -> tuple[dict[str, np.ndarray], pa.Table, np.ndarray, tuple[str, ...]]:
    """One window's feeds (token inputs padded to one width), kept columns, token counts, and
    the inputs its pieces carried for the postprocessor (dropped: each piece has its width)."""
    lengths = np.concatenate([feeds[TOKEN_COUNTS] for feeds, _ in window])
    width = budget.width(int(lengths.max()))
    rows = len(lengths)
    feeds: dict[str, np.ndarray] = {}
    for name, first in window[0][0].items():
        if name == TOKEN_COUNTS:
            continue
        if name not in pads:
            feeds[name] = np.concatenate([f[name] for f, _ in window])
            continue
        # Each piece is padded to its own longest row, at most the window's.
        out = np.full((rows, width), pads[name], first.dtype)
        at = 0
        for f, _ in window:
            part = f[name]
            out[at:at + len(part), :part.shape[1]] = part[:, :width]
            at += len(part)
        feeds[name] = out
    carried = [n for n in window[0][1].column_names if n.startswith(CARRY_PREFIX)]
    tables = [k.drop_columns(carried) for _, k in window]
    kept = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    return feeds, kept, lengths, tuple(n[len(CARRY_PREFIX):] for n in carried)


def length_batches(pieces: Iterator[Piece], budget: TokenBudget, pads: Mapping[str, int]
                   ) -> Iterator[list[Piece]]:
    """Text batches: each window's rows sorted by token count, cut to `budget`, shortest first.

    Every batch is one piece: token inputs cut to the batch's own width, the rows' kept
    columns, and `ORDER`, each row's index in the shard, so `InputOrder` can restore the
    input order. Model inputs carried for the postprocessor (the attention mask) are carried
    again at each batch's width. `pads`: the value each token input is padded with.
    """
    first_row = 0
    for window in exact_batches(pieces, budget.window):
        feeds, kept, lengths, carried = _join(window, budget, pads)
        kept = kept.append_column(ORDER, pa.array(np.arange(first_row, first_row + len(lengths),
                                                            dtype=np.int64)))
        # Stable: rows of one length keep their input order.
        order = np.argsort(lengths, kind="stable")
        for start, stop in budget.cut(lengths[order]):
            rows = order[start:stop]
            width = budget.width(int(lengths[rows[-1]]))
            batch = {name: array[rows, :width] if name in pads else array[rows]
                     for name, array in feeds.items()}
            yield [(batch, carry_inputs(kept.take(pa.array(rows)), batch, carried))]
        first_row += len(lengths)


class InputOrder:
    """Writes the output tables of sorted batches in input order, without the `ORDER` column.

    Tables arrive in any order of rows; whenever the rows held so far are exactly the next
    ones in input order (at the latest when a window's last batch arrives), they are written
    as one table, sorted.
    """

    def __init__(self, write: Callable[[pa.Table], None]) -> None:
        self._write = write
        self._held: list[pa.Table] = []
        self._rows = 0
        self._next = 0  # the first row not yet written
        self._top = -1  # the largest row held

    def __call__(self, table: pa.Table) -> None:
        order = table.column(ORDER)
        self._held.append(table)
        self._rows += table.num_rows
        if table.num_rows:
            self._top = max(self._top, int(order.to_numpy().max()))
        if self._rows and self._rows == self._top + 1 - self._next:
            self._flush()

    def _flush(self) -> None:
        first = self._held[0].schema
        for other in self._held[1:]:
            for a, b in zip(first, other.schema, strict=True):
                if a.type != b.type:
                    raise DataError(f"output column '{a.name}' is {a.type} in one batch and "
                                    f"{b.type} in another: batches of different widths cannot "
                                    "be written together, and an output with a token axis "
                                    "needs one width; pool it (--postprocess embedding) or pad "
                                    "every row to max_length (padding: max_length)")
        table = pa.concat_tables(self._held)
        position = table.column(ORDER).to_numpy() - self._next
        permutation = np.empty(len(position), np.int64)
        permutation[position] = np.arange(len(position))
        self._write(table.take(pa.array(permutation)).drop_columns([ORDER]))
        self._next += self._rows
        self._held, self._rows = [], 0

    def close(self) -> None:
        """Check that every row was written (a row never given would hold the rest back)."""
        if self._held:
            raise BackendError(f"{self._rows} output row(s) after row {self._next} were never "
                               "written: the rows before them did not all arrive")
