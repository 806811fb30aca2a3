from __future__ import annotations

import pyarrow as pa
import pytest

from jobs.validate import check_keep, resolve_bindings, schema_problem
from tests.models import two_input_model, two_input_table
from workers.errors import SpecError
from workers.tensors import describe_onnx

MODEL = describe_onnx(two_input_model())
SCHEMA = two_input_table(2).schema


def test_mapped_and_same_name_bindings() -> None:
    schema = SCHEMA.append(pa.field("meta", pa.list_(pa.float32(), 8)))
    assert resolve_bindings({"image": "img"}, MODEL, schema, "input 'x'") == (
        ("image", "img"), ("meta", "meta"))


def test_unknown_column_names_the_input_and_fix() -> None:
    with pytest.raises(SpecError, match=r"column 'pixels' \(for model input 'image', mapped by "
                       r"--column\) is not in input 'x'; its columns are \['uid', 'name', 'img', "
                       r"'features'\]; map it with --column image=COLUMN"):
        resolve_bindings({"image": "pixels", "meta": "features"}, MODEL, SCHEMA, "input 'x'")


def test_unmapped_input_without_column() -> None:
    with pytest.raises(SpecError, match=r"column 'meta' .*of the same name"):
        resolve_bindings({"image": "img"}, MODEL, SCHEMA, "input 'x'")


def test_mapping_names_unknown_model_input() -> None:
    with pytest.raises(SpecError, match=r"--column maps \['pixels'\], but the model's inputs are "
                       r"\['image', 'meta'\]"):
        resolve_bindings({"pixels": "img"}, MODEL, SCHEMA, "input 'x'")


def test_wrong_typed_column() -> None:
    with pytest.raises(SpecError, match="column 'name' is string, but input 'image'"):
        resolve_bindings({"image": "name", "meta": "features"}, MODEL, SCHEMA, "input 'x'")


def test_keep_checks() -> None:
    check_keep(("uid", "name"), MODEL, SCHEMA, "input 'x'")
    with pytest.raises(SpecError, match="--keep column 'nope' is not in input 'x'"):
        check_keep(("nope",), MODEL, SCHEMA, "input 'x'")
    schema = SCHEMA.append(pa.field("score", pa.float32()))
    with pytest.raises(SpecError, match=r"--keep column\(s\) \['score'\] have the same name as model"):
        check_keep(("score",), MODEL, schema, "input 'x'")


def test_schema_problem_for_other_files() -> None:
    bindings = (("image", "img"), ("meta", "features"))
    assert schema_problem(bindings, ("uid",), MODEL, SCHEMA) is None
    assert "no column(s) ['features']" in str(
        schema_problem(bindings, (), MODEL, SCHEMA.remove(SCHEMA.get_field_index("features"))))
    changed = SCHEMA.set(SCHEMA.get_field_index("features"), pa.field("features", pa.string()))
    assert "column 'features' is string" in str(schema_problem(bindings, (), MODEL, changed))
