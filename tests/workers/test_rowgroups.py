"""Parallel row-group reading and regrouping into exact batches."""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.workers.test_pipeline import whole_file_shard
from workers.batching import exact_batches
from workers.errors import DataError
from workers.rowgroups import Piece, ReadPool, RowGroupReader
from workers.storage import file_version, filesystem
from workers.types import Shard


def write(path: Path, row_groups: list[int], seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = sum(row_groups)
    table = pa.table({"uid": np.arange(rows), "x": rng.standard_normal(rows)})
    writer = pq.ParquetWriter(path, table.schema)
    start = 0
    for n in row_groups:
        writer.write_table(table.slice(start, n))
        start += n
    writer.close()
    return table


def to_piece(table: pa.Table) -> Piece:
    return {"x": table.column("x").to_numpy()}, table.select(["uid"])


@pytest.mark.parametrize("threads", [1, 3])
def test_reader_yields_row_groups_in_order(tmp_path: Path, threads: int) -> None:
    sizes = [7, 1, 30, 12, 5, 19, 2, 40, 3]
    table = write(tmp_path / "a.parquet", sizes, seed=threads)
    with RowGroupReader(whole_file_shard(str(tmp_path / "a.parquet")), ["uid", "x"], to_piece,
                        threads=threads, ahead=1) as reader:
        got = list(reader)
    assert [kept.num_rows for _, kept, _, _ in got] == sizes
    uid = np.concatenate([kept.column("uid").to_numpy() for _, kept, _, _ in got])
    x = np.concatenate([feeds["x"] for feeds, _, _, _ in got])
    np.testing.assert_array_equal(uid, table.column("uid").to_numpy())
    np.testing.assert_array_equal(x, table.column("x").to_numpy())
    assert all(read >= 0 and conv >= 0 for _, _, read, conv in got)


def test_reader_reads_only_the_shards_row_groups(tmp_path: Path) -> None:
    write(tmp_path / "a.parquet", [10, 20, 30, 40])
    shard = whole_file_shard(str(tmp_path / "a.parquet"))
    middle = replace(shard, row_groups=(1, 3), rows=50)
    with RowGroupReader(middle, ["uid", "x"], to_piece, threads=2) as reader:
        uid = np.concatenate([kept.column("uid").to_numpy() for _, kept, _, _ in reader])
    np.testing.assert_array_equal(uid, np.arange(10, 60))


def test_reader_stops_early_without_hanging(tmp_path: Path) -> None:
    write(tmp_path / "a.parquet", [5] * 40)
    with RowGroupReader(whole_file_shard(str(tmp_path / "a.parquet")), ["uid", "x"], to_piece,
                        threads=2) as reader:
        first = next(iter(reader))
    assert first[1].num_rows == 5


def test_reader_names_missing_columns(tmp_path: Path) -> None:
    write(tmp_path / "a.parquet", [5])
    with pytest.raises(DataError, match=r"has no column\(s\) \['img'\]"):
        RowGroupReader(whole_file_shard(str(tmp_path / "a.parquet")), ["uid", "img"], to_piece)


def test_reader_sees_a_changed_file(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    write(path, [5])
    shard = whole_file_shard(str(path))
    write(path, [5, 6])
    os.utime(path, (1, 1))
    with pytest.raises(DataError, match="changed after the job listed it"):
        RowGroupReader(shard, ["uid", "x"], to_piece)


def test_reader_says_when_a_file_is_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    path.write_bytes(b"not parquet at all, " * 10)
    fs, p = filesystem(str(path))
    info = fs.info(p)
    shard = Shard(url=str(path), size=int(info["size"]), version=file_version(info),
                  row_groups=(0, 1), rows=5)
    with pytest.raises(DataError, match="is not a readable Parquet file"):
        RowGroupReader(shard, ["uid", "x"], to_piece)


def test_reader_rejects_zero_threads(tmp_path: Path) -> None:
    write(tmp_path / "a.parquet", [5])
    with pytest.raises(ValueError, match="at least one thread, got 0"):
        RowGroupReader(whole_file_shard(str(tmp_path / "a.parquet")), ["uid"], to_piece,
                       threads=0)


@pytest.mark.parametrize("batch_size", [1, 4, 7, 64, 1000])
def test_exact_batches_regroup_across_row_groups(batch_size: int) -> None:
    rng = np.random.default_rng(batch_size)
    sizes = [int(n) for n in rng.integers(1, 30, size=12)]
    total = sum(sizes)
    values = rng.standard_normal(total)
    pieces, start = [], 0
    for n in sizes:
        pieces.append(({"x": values[start:start + n]},
                       pa.table({"uid": np.arange(start, start + n)})))
        start += n
    batches = list(exact_batches(iter(pieces), batch_size))
    rows = [sum(kept.num_rows for _, kept in batch) for batch in batches]
    assert rows[:-1] == [batch_size] * (len(rows) - 1)
    assert 0 < rows[-1] <= batch_size and sum(rows) == total
    x = np.concatenate([feeds["x"] for batch in batches for feeds, _ in batch])
    uid = np.concatenate([kept.column("uid").to_numpy() for batch in batches for _, kept in batch])
    np.testing.assert_array_equal(x, values)
    np.testing.assert_array_equal(uid, np.arange(total))


def test_exact_batches_rejects_zero() -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        list(exact_batches(iter([]), 0))


def test_reader_names_a_corrupt_row_group(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    write(path, [50, 50], seed=3)
    meta = pq.read_metadata(path)
    column = meta.row_group(1).column(1)
    start = (column.dictionary_page_offset if column.has_dictionary_page
             else column.data_page_offset)
    data = bytearray(path.read_bytes())
    data[start:start + 8] = b"\xff" * 8  # the first page header: undecodable
    path.write_bytes(bytes(data))
    with RowGroupReader(whole_file_shard(str(path)), ["uid", "x"], to_piece, threads=2) as reader:
        rows = iter(reader)
        assert next(rows)[1].num_rows == 50
        with pytest.raises(DataError, match=r"has a corrupt row group 1"):
            next(rows)


def test_read_pool_runs_the_lowest_priority_first() -> None:
    pool = ReadPool(1)
    gate = threading.Event()
    order: list[tuple[int, int]] = []
    try:
        first = pool.submit((9, 9), gate.wait)  # holds the only thread
        futures = [pool.submit(p, lambda p=p: order.append(p))
                   for p in [(1, 2), (0, 5), (1, 0), (0, 1)]]
        gate.set()
        first.result()
        for future in futures:
            future.result()
        assert order == [(0, 1), (0, 5), (1, 0), (1, 2)]
        failing = pool.submit((0, 0), lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failing.result()
    finally:
        pool.close()
    with pytest.raises(RuntimeError, match="ReadPool is closed"):
        pool.submit((0, 0), lambda: None)


def test_read_pool_close_drops_queued_tasks() -> None:
    pool = ReadPool(1)
    started, gate, dropped = threading.Event(), threading.Event(), threading.Event()

    def hold() -> bool:
        started.set()
        return gate.wait()

    running = pool.submit((0, 0), hold)
    queued = pool.submit((0, 1), lambda: None)
    queued.add_done_callback(lambda _: dropped.set())
    started.wait()
    closer = threading.Thread(target=pool.close)
    closer.start()
    dropped.wait()  # close() cancelled the queued task; now let the running one end
    gate.set()
    closer.join()
    assert running.result() is True
    assert queued.cancelled()


def test_two_readers_share_a_pool(tmp_path: Path) -> None:
    """Shards on one pool: each gets its own rows, in order, whatever the interleaving."""
    write(tmp_path / "a.parquet", [7, 9, 11, 13], seed=1)
    write(tmp_path / "b.parquet", [5, 6, 8], seed=2)
    pool = ReadPool(3)
    try:
        with RowGroupReader(whole_file_shard(str(tmp_path / "a.parquet")), ["uid", "x"],
                            to_piece, pool=pool, priority=0) as a, \
                RowGroupReader(whole_file_shard(str(tmp_path / "b.parquet")), ["uid", "x"],
                               to_piece, pool=pool, priority=1) as b:
            rows_b = [kept.num_rows for _, kept, _, _ in b]
            rows_a = [kept.num_rows for _, kept, _, _ in a]
        assert (rows_a, rows_b) == ([7, 9, 11, 13], [5, 6, 8])
    finally:
        pool.close()


def test_read_pool_rejects_zero_threads() -> None:
    with pytest.raises(ValueError, match="ReadPool needs at least one thread, got 0"):
        ReadPool(0)
