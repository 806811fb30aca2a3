"""The TensorRT build options of a job spec: flags, YAML, validation, the BuildConfig they make."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from jobs.spec import spec_from_args
from workers.errors import SpecError
from workers.plan_build import BuildConfig

BASE = ["--model", "m.onnx", "--input", "in/", "--output", "out/"]


def test_defaults_build_one_profile_up_to_the_batch_size() -> None:
    spec = spec_from_args([*BASE, "--batch-size", "128"])
    assert (spec.workspace, spec.optimization_level) == (None, None)
    assert not (spec.hardware_compatible or spec.version_compatible or spec.exclude_lean_runtime)
    assert spec.build_config() == BuildConfig(profiles=((1, 128, 128),))


def test_flags() -> None:
    spec = spec_from_args([*BASE, "--precision", "fp16", "--workspace", "2GiB",
                           "--optimization-level", "5", "--hardware-compatible",
                           "--version-compatible", "--exclude-lean-runtime",
                           "--plan-cache", "s3://b/plans"])
    assert spec.workspace == 2 * 1024**3 and spec.plan_cache == "s3://b/plans"
    config = spec.build_config()
    assert (config.precision, config.workspace, config.optimization_level) == ("fp16", 2 << 30, 5)
    assert config.hardware_compatible and config.version_compatible
    assert config.exclude_lean_runtime
    assert spec.to_json()["workspace"] == 2 << 30


def test_yaml(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text("model: m\ninput: i\noutput: o\nworkspace: 512MiB\noptimization-level: 1\n"
                      "version_compatible: true\n")
    spec = spec_from_args(["--config", str(config)])
    assert (spec.workspace, spec.optimization_level, spec.version_compatible) == (
        512 * 1024**2, 1, True)


@pytest.mark.parametrize(("argv", "message"), [
    (["--workspace", "lots"], "workspace must be a size in bytes such as 4294967296, 4GiB or "
                              "512MiB, got 'lots'"),
    (["--optimization-level", "9"], "optimization_level must be an integer from 0 to 5, got 9"),
    (["--exclude-lean-runtime"], "exclude_lean_runtime only applies to version-compatible plans; "
                                 "add --version-compatible or drop --exclude-lean-runtime"),
    (["--precision", "fp8", "--hardware-compatible"], "precision fp8 cannot be built "
                                                      "hardware-compatible"),
])
def test_bad_build_options(argv: list[str], message: str) -> None:
    with pytest.raises(SpecError, match=re.escape(message)):
        spec_from_args([*BASE, *argv])


def test_yaml_flags_must_be_booleans(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text("model: m\ninput: i\noutput: o\nhardware_compatible: 'yes please'\n")
    with pytest.raises(SpecError, match="hardware_compatible must be true or false, got 'yes please'"):
        spec_from_args(["--config", str(config)])
