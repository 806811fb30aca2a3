"""Batching: converted pieces of a shard regrouped into the batches the engine runs."""

from __future__ import annotations

from collections.abc import Iterator

from workers.rowgroups import Piece


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
