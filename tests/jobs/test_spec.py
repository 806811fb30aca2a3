from __future__ import annotations

from pathlib import Path

import pytest

from jobs.spec import JobSpec, spec_from_args, spec_from_settings
from workers.errors import SpecError

BASE = ["--model", "m.onnx", "--input", "in/", "--output", "out/"]


def test_flags_parse_into_a_frozen_spec() -> None:
    spec = spec_from_args([*BASE, "--column", "image=img", "--column", "meta=features",
                           "--keep", "uid", "--keep", "name", "--batch-size", "64",
                           "--workers", "3", "--rows-per-shard", "1000", "--backend", "onnxruntime",
                           "--storage-options", '{"anon": false, "client_kwargs": {"region_name": "x"}}'])
    assert spec.column_map == {"image": "img", "meta": "features"}
    assert spec.keep == ("uid", "name")
    assert (spec.batch_size, spec.workers, spec.rows_per_shard) == (64, 3, 1000)
    assert spec.storage == {"anon": False, "client_kwargs": {"region_name": "x"}}
    with pytest.raises(AttributeError):
        spec.batch_size = 1  # type: ignore[misc]
    hash(spec)


def test_yaml_config_and_flags_override(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text("model: a.onnx\ninput: in/\noutput: out/\nbatch-size: 32\n"
                      "columns: {image: img, meta: m}\nkeep: [uid]\nmax_failed_shards: 2\n")
    spec = spec_from_args(["--config", str(config), "--batch-size", "8", "--column", "meta=features"])
    assert spec.model == "a.onnx" and spec.batch_size == 8 and spec.max_failed_shards == 2
    assert spec.column_map == {"image": "img", "meta": "features"}
    assert spec.keep == ("uid",)


def test_defaults() -> None:
    spec = spec_from_args(BASE)
    assert spec.backend == "auto" and spec.workers is None and spec.batch_size is None
    # None: resolved once the workers are known (shards balanced over them, CPUs per GPU).
    assert spec.rows_per_shard is None and spec.cpus_per_worker is None
    assert spec.max_failed_shards == 0 and not spec.overwrite
    assert spec.max_batch_tokens is None and spec.sort_window is None
    # Batches: 256 rows, except text: 1024 on GPUs (fewer launches per row), 16 on CPU engines
    # (ONNX Runtime on CPUs gains nothing from more rows, and a batch spanning more lengths
    # pads more); --batch-size always wins.
    assert [spec.batch_rows(gpus, text) for gpus, text in
            ((True, True), (True, False), (False, False), (False, True))] == [1024, 256, 256, 16]
    assert spec_from_args([*BASE, "--batch-size", "100"]).batch_rows(False, True) == 100


@pytest.mark.parametrize(("argv", "message"), [
    (["--input", "i", "--output", "o"], "model is required; pass --model URI"),
    ([*BASE, "--batch-size", "0"], "batch_size must be an integer >= 1, got 0"),
    ([*BASE, "--workers", "-2"], "workers must be an integer >= 1, got -2"),
    ([*BASE, "--max-failed-shards", "-1"], "max_failed_shards must be an integer >= 0, got -1"),
    ([*BASE, "--column", "image"], "--column 'image' is not INPUT=COLUMN"),
    ([*BASE, "--storage-options", "{bad"], "storage_options is not valid JSON"),
    ([*BASE, "--storage-options", "[1]"], "storage_options must be a JSON object, got list"),
])
def test_bad_flags(argv: list[str], message: str) -> None:
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        spec_from_args(argv)


@pytest.mark.parametrize(("yaml", "message"), [
    ("model: m\ninput: i\noutput: o\nbatchsize: 3\n", r"unknown setting\(s\) \['batchsize'\]"),
    ("- a\n- b\n", "must be a mapping of settings, got list"),
    ("model: [unclosed\n", "is not valid YAML"),
    ("model: m\ninput: i\noutput: o\nkeep: uid\n", "keep in config .* must be a list of column names"),
    ("model: m\ninput: i\noutput: o\ncolumns: [a]\n", "columns in config .* must be a mapping"),
    ("model: m\ninput: i\noutput: o\nbackend: torch\n", "backend must be one of auto, tensorrt, onnxruntime"),
    ("model: m\ninput: i\noutput: o\nworkers: '4'\n", "workers must be an integer >= 1, got '4'"),
])
def test_bad_yaml(tmp_path: Path, yaml: str, message: str) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(yaml)
    with pytest.raises(SpecError, match=message):
        spec_from_args(["--config", str(config)])


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"cannot read config .*nope\.yaml"):
        spec_from_args(["--config", str(tmp_path / "nope.yaml")])


def test_input_mapped_twice() -> None:
    with pytest.raises(SpecError, match=r"model input\(s\) \['x'\] are mapped more than once"):
        JobSpec(model="m", input="i", output="o", columns=(("x", "a"), ("x", "b")))


def test_settings_json_hides_storage_values() -> None:
    spec = spec_from_settings({"model": "m", "input": "i", "output": "o",
                               "storage_options": {"key": "secret"}})
    assert spec.to_json()["storage_options"] == ["key"]


def test_file_extensions() -> None:
    assert spec_from_args(BASE).file_extensions == ("parquet",)
    spec = spec_from_args([*BASE, "--file-extensions", ".Parquet, pq"])
    assert spec.file_extensions == ("parquet", "pq")
    assert spec_from_settings({"model": "m", "input": "i", "output": "o",
                               "file_extensions": ["parq"]}).file_extensions == ("parq",)
    assert spec_from_args([*BASE, "--file-extensions", "*"]).file_extensions == ("*",)
    with pytest.raises(SpecError, match=r"file_extensions must name at least one extension "
                       r"\(such as parquet,pq, or '\*' for every file\), got \[\]"):
        spec_from_args([*BASE, "--file-extensions", ","])
