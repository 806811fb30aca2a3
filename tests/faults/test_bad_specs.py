"""The bad-spec table of docs/failure-semantics.md, row by row: each exits 2 with its message.

The table is the test's data, so the documentation cannot drift from the behaviour.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import jobs.driver
from jobs.cli import main

pytestmark = pytest.mark.faults

DOC = Path(__file__).resolve().parents[2] / "docs" / "failure-semantics.md"
BASE = ("--model MODEL --input DATA --output OUT --column image=img --column meta=features "
        "--keep uid --backend onnxruntime")


def table_rows() -> list[tuple[str, str, str]]:
    """(option, example, message) for each row of the "Bad specs" table that has an example."""
    text = DOC.read_text()
    section = text.split("\n## Bad specs\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[1].startswith("`") or cells[0] == "option":
            continue
        example, message = (re.fullmatch(r"`(.*)`", c) for c in cells[1:])
        if example and message:
            rows.append((cells[0].strip("`"), example.group(1), message.group(1)))
    return rows


ROWS = table_rows()


def test_the_table_is_complete() -> None:
    options = {option for option, _, _ in ROWS}
    for flag in ("--batch-size", "--rows-per-shard", "--workers", "--shards-in-flight",
                 "--cpus-per-worker", "--max-retries", "--max-failed-shards",
                 "--max-actor-deaths", "--lock-timeout", "--backend", "--precision", "--column",
                 "--keep", "--storage-options", "--model", "--input", "--output", "--config",
                 "--slots", "--concurrent-batches", "--readers"):
        assert flag in options, f"{flag} has no row in the bad-spec table"
    assert len(ROWS) >= 30


@pytest.fixture
def places(tmp_path: Path, two_input_onnx: Path, dataset: Path) -> dict[str, str]:
    """What the table's words stand for: a real model and dataset, and bad inputs."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("not parquet")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "part-0.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    (tmp_path / "notes.txt").write_text("not onnx")
    return {"MODEL": str(two_input_onnx), "DATA": str(dataset), "OUT": str(tmp_path / "out"),
            "DIR": str(tmp_path)}


def fill(text: str, places: dict[str, str]) -> str:
    for word, value in places.items():
        text = re.sub(rf"\b{word}\b", value, text)
    return text


@pytest.mark.parametrize("option, example, message", ROWS, ids=[r[1] for r in ROWS])
def test_bad_spec(option: str, example: str, message: str, places: dict[str, str],
                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  capsys: pytest.CaptureFixture[str]) -> None:
    def no_ray() -> None:
        raise AssertionError(f"{example!r} reached Ray: it is not a bad spec")

    monkeypatch.setattr(jobs.driver, "init_ray", no_ray)
    argv = shlex.split(fill(BASE, places))
    if example.startswith("config: "):
        config = tmp_path / "job.yaml"
        config.write_text(example.removeprefix("config: ") + "\n")
        argv += ["--config", str(config)]
    else:
        argv += shlex.split(fill(example, places))
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert fill(message, places) in err
    assert not (tmp_path / "out").exists()  # nothing was written
