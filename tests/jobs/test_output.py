"""The output directory's identity check and part names, on real local directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from jobs.output import JOB_FILE, OutputDir, fingerprint
from workers.errors import OutputConflictError
from workers.types import Shard


def identity(input: str, model_sha256: str = "ab" * 32, **kw: Any) -> dict[str, Any]:
    key: dict[str, Any] = {"model_sha256": model_sha256, "input": input,
                           "bindings": [["image", "img"]], "keep": ["uid"], "precision": "fp32"}
    key.update(kw)
    return {"fingerprint": fingerprint(key), "model": "/models/m.onnx", **key}


def shard(url: str, position: int, start: int) -> Shard:
    return Shard(url=url, size=100, version="mtime=1", row_groups=(start, start + 1), rows=10,
                 position=position)


def write_part(out: Path, name: str) -> None:
    out.mkdir(exist_ok=True)
    (out / name).write_bytes(b"PAR1 stand-in for a part PAR1")


def test_another_jobs_output_names_the_field_and_both_values(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_part(out, f"part-{'0' * 24}.parquet")
    (out / JOB_FILE).write_text(json.dumps(identity("/data/a")))
    with pytest.raises(OutputConflictError) as info:
        OutputDir(str(out)).check(identity("/data/b"), overwrite=False)
    assert str(info.value) == (
        f"output '{out}' already holds 1 part(s) of another job (input: '/data/a' there, "
        "'/data/b' in this job); choose another --output, or pass --overwrite to replace them")
    (out / JOB_FILE).write_text(json.dumps(identity("/data/b", model_sha256="cd" * 32,
                                                    precision="fp16")))
    with pytest.raises(OutputConflictError, match=r"\(model: sha256 cdcdcdcdcdcd of "
                       r"'/models/m.onnx' there, sha256 abababababab of '/models/m.onnx' in this "
                       r"job; precision: fp16 there, fp32 in this job\)"):
        OutputDir(str(out)).check(identity("/data/b"), overwrite=False)


def test_record_of_an_earlier_version_with_the_input_as_typed_is_the_same_job(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before inputs were canonical, `_job.json` held `demo-data/digits/` as typed."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    write_part(out, f"part-{'1' * 24}.parquet")
    (out / JOB_FILE).write_text(json.dumps(identity("demo-data/digits/")))
    current = identity(str(tmp_path / "demo-data" / "digits"))
    target = OutputDir(str(out))
    assert target.check(current, overwrite=False) == {"1" * 24: f"part-{'1' * 24}.parquet"}
    assert target.earlier_fingerprints == {identity("demo-data/digits/")["fingerprint"]}
    target.claim(current, overwrite=False)  # rewrites the record in the current form
    assert json.loads((out / JOB_FILE).read_text())["fingerprint"] == current["fingerprint"]


def test_parts_are_renamed_to_their_input_order_names(tmp_path: Path) -> None:
    out = tmp_path / "out"
    a, b, c = shard("/in/a", 0, 0), shard("/in/a", 0, 1), shard("/in/b", 1, 0)
    assert a.part_name == f"part-000000-000000-{a.id}.parquet"
    assert c.part_name == f"part-000001-000000-{c.id}.parquet"
    write_part(out, f"part-{a.id}.parquet")  # named by an earlier version
    write_part(out, b.part_name)
    # A file added before /in/b's moved it from position 0 to 1; a rename was interrupted.
    write_part(out, f"part-000000-000000-{c.id}.parquet")
    write_part(out, c.part_name)
    target = OutputDir(str(out))
    renamed = target.align_parts([a, b, c])
    assert renamed == [(f"part-{a.id}.parquet", a.part_name)]
    assert sorted(p.name for p in out.iterdir()) == sorted([a.part_name, b.part_name,
                                                            c.part_name])
    assert target.committed() == {s.id: s.part_name for s in (a, b, c)}


def test_part_names_sort_in_input_order() -> None:
    shards = [shard(f"/in/{f}", position, start) for position, f in enumerate("abcdefghijkl")
              for start in (0, 1, 2, 10, 11)]
    assert sorted(shards, key=lambda s: s.part_name) == shards
