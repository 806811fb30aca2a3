"""What the README and docs tell a new user matches what the code does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from jobs.demo import DEFAULT_WORKDIR
from jobs.spec import build_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _help(flag: str) -> str:
    action = next(a for a in build_parser()._actions if flag in a.option_strings)
    return " ".join(str(action.help).split())


def test_every_extra_is_listed() -> None:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from "
                                  "Python 3.11")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    listed = README[README.index("Extras:"):].split("\n\n", 1)[0]
    missing = [name for name in extras if f"`{name}`" not in listed]
    assert not missing, f"README's extras list lacks {missing}"


def test_examples_and_the_demo_write_to_separate_folders() -> None:
    """`examples.digits` once wrote its images into the demo's input folder."""
    made = re.findall(r"python -m examples\.(\w+) (\S+)", README)
    assert {name for name, _ in made} == {"patients", "reviews", "digits", "lenet"}
    folders = [Path(d) for _, d in made] + [Path(DEFAULT_WORKDIR)]
    for i, a in enumerate(folders):
        for b in folders[i + 1:]:
            assert a != b and a not in b.parents and b not in a.parents, (a, b)
    # Each example job reads inside the folder its example wrote.
    for name, folder in made:
        block = README[README.index(f"python -m examples.{name} {folder}"):].split("\n\n")[0]
        inputs = re.findall(r"--input (\S+)", block)
        assert inputs and all(Path(folder) in Path(i).parents for i in inputs), (name, inputs)


def test_max_retries_help_agrees_with_the_docs() -> None:
    """Data errors are never retried (docs/failure-semantics.md); the flag's help said so too."""
    text = _help("--max-retries")
    assert "fails on its data" not in text
    assert re.search(r"bad data[^.]* not retried", text) and "(default 2)" in text, text
    row = next(line for line in README.splitlines() if line.startswith("| `--max-retries N`"))
    assert "not retried" in row


def test_row_groups_are_documented_as_half_open() -> None:
    semantics = (REPO / "docs" / "failure-semantics.md").read_text()
    row = next(line for line in semantics.splitlines() if line.startswith("| `shards` |"))
    assert "`row_groups` `[start, stop)`" in row and "half-open" in row


def test_duckdb_reading_of_fixed_size_columns_is_documented() -> None:
    columns = (REPO / "docs" / "tensor-columns.md").read_text()
    assert "FLOAT[]" in columns and "CAST(embedding AS FLOAT[64])" in columns


def test_row_alignment_is_defined() -> None:
    section = README[README.index("### Row alignment"):].split("\n## ")[0]
    for promise in ("exactly one input row", "input order", "part names sort",
                    "--keep", "row_failures"):
        assert promise in section, promise
