from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.shards import BadFile, InputFile, cut_shards, list_input, read_footers
from tests.models import two_input_table, write_dataset
from workers.errors import SpecError


def _files(url: str) -> list[InputFile | BadFile]:
    fs, listing = list_input(url)
    return read_footers(fs, listing)


def test_directory_listing_skips_hidden_and_reads_footers(tmp_path: Path) -> None:
    write_dataset(str(tmp_path), files=2, rows_per_file=250, row_group_rows=100)
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / ".part.tmp").write_text("")
    (tmp_path / "_tmp").mkdir()
    (tmp_path / "_tmp" / "x.parquet").write_text("")
    files = _files(str(tmp_path))
    assert [os.path.basename(f.url) for f in files] == ["data-000.parquet", "data-001.parquet"]
    first = files[0]
    assert isinstance(first, InputFile)
    assert first.row_group_rows == (100, 100, 50) and first.rows == 250
    assert first.schema.names == ["uid", "name", "img", "features"]


def test_glob_and_single_file(tmp_path: Path) -> None:
    write_dataset(str(tmp_path), files=3, rows_per_file=10, row_group_rows=10)
    assert len(_files(str(tmp_path / "data-00[01].parquet"))) == 2
    assert len(_files(str(tmp_path / "data-002.parquet"))) == 1


def test_shards_are_whole_row_groups(tmp_path: Path) -> None:
    write_dataset(str(tmp_path), files=2, rows_per_file=250, row_group_rows=100)
    files = [f for f in _files(str(tmp_path)) if isinstance(f, InputFile)]
    shards = cut_shards(files, rows_per_shard=150)
    assert [(os.path.basename(s.url), s.row_groups, s.rows) for s in shards] == [
        ("data-000.parquet", (0, 2), 200), ("data-000.parquet", (2, 3), 50),
        ("data-001.parquet", (0, 2), 200), ("data-001.parquet", (2, 3), 50)]
    assert sum(s.rows for s in shards) == 500
    assert len({s.id for s in shards}) == 4


def test_shard_ids_are_stable_and_change_with_the_file(tmp_path: Path) -> None:
    write_dataset(str(tmp_path), files=1, rows_per_file=100, row_group_rows=50)
    ids = [s.id for s in cut_shards(_files(str(tmp_path)), 50)]  # type: ignore[arg-type]
    assert ids == [s.id for s in cut_shards(_files(str(tmp_path)), 50)]  # type: ignore[arg-type]
    time.sleep(0.01)  # a distinct mtime for the rewrite
    path = tmp_path / "data-000.parquet"
    pq.write_table(two_input_table(100, seed=99), path, row_group_size=50)
    os.utime(path, (time.time() + 5, time.time() + 5))
    changed = [s.id for s in cut_shards(_files(str(tmp_path)), 50)]  # type: ignore[arg-type]
    assert not set(changed) & set(ids)


def test_corrupt_file_becomes_a_bad_file(tmp_path: Path) -> None:
    write_dataset(str(tmp_path), files=1, rows_per_file=10, row_group_rows=10)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    files = _files(str(tmp_path))
    bad = [f for f in files if isinstance(f, BadFile)]
    assert len(bad) == 1 and bad[0].url.endswith("broken.parquet")
    assert "not a readable Parquet file" in bad[0].reason


def test_empty_file_gives_no_shards(tmp_path: Path) -> None:
    pq.write_table(two_input_table(1).slice(0, 0), tmp_path / "empty.parquet")
    files = [f for f in _files(str(tmp_path)) if isinstance(f, InputFile)]
    assert files[0].rows == 0
    assert cut_shards(files, 10) == []


def test_nonexistent_input(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"input '.*nowhere' does not exist; check --input"):
        list_input(str(tmp_path / "nowhere"))


def test_directory_without_files(tmp_path: Path) -> None:
    (tmp_path / "_SUCCESS").write_text("")
    with pytest.raises(SpecError, match="holds no files; check --input"):
        list_input(str(tmp_path))
