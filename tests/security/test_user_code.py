"""Issue 17, point 7: a config file names user code only with --allow-user-code.

`preprocess`/`postprocess` items naming `module:function` were imported in the driver while the
spec was validated, before the output and lock checks: a config from elsewhere ran a module's
top-level code although the job was then refused. Functions named on the command line are the
user's own choice and need no flag.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs.lease import LOCK_FILE
from tests.faults.helpers import REPO
from tests.security.test_lock_fields import NOW, plant

pytestmark = pytest.mark.subprocess
MODULE = "tests.security.planted_module"


def run(args: list[str], marker: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PLANTED_IMPORT_MARKER": str(marker)}
    return subprocess.run([sys.executable, "-m", "jobs.run", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def locked_output(tmp_path: Path) -> Path:
    """An output another job holds: every job here is refused after its spec is validated."""
    out = tmp_path / "out"
    plant(out, heartbeat=NOW * 10)  # a heartbeat far in the future: fresh for any reader
    assert (out / LOCK_FILE).exists()
    return out


def config(tmp_path: Path, model: Path, data: Path, out: Path, **settings: object) -> Path:
    """A job config; model input `meta` comes from its column unless a function feeds it."""
    fed_by_function = any(isinstance(i, dict) and "meta" in i.get("inputs", ())
                          for i in settings.get("preprocess", []))  # type: ignore[attr-defined]
    columns = {"image": "img"} if fed_by_function else {"image": "img", "meta": "features"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({
        "model": str(model), "input": str(data), "output": str(out), "columns": columns,
        "backend": "onnxruntime", **settings}))
    return path


@pytest.mark.parametrize("section", ["preprocess", "postprocess"])
def test_a_config_naming_user_code_is_refused_before_anything_is_imported(
        section: str, two_input_onnx: Path, dataset: Path, locked_output: Path,
        tmp_path: Path) -> None:
    item = ({"kind": f"{MODULE}:prep", "columns": ["uid"], "inputs": ["meta"]}
            if section == "preprocess" else {"kind": f"{MODULE}:post"})
    job = config(tmp_path, two_input_onnx, dataset, locked_output, **{section: [item]})
    marker = tmp_path / "imported"
    result = run(["--config", str(job)], marker)
    assert result.returncode == 2, result.stderr
    function = item["kind"]
    assert (f"error: config '{job}' names user code ({section}[0]: {function}), which the "
            "runner would import and run in the driver and on every worker; pass "
            "--allow-user-code if you trust this config, or name the function on the command "
            f"line (--{section} {function})") in result.stderr
    assert not marker.exists(), marker.read_text()


def test_allow_user_code_lets_a_trusted_config_name_functions(
        two_input_onnx: Path, dataset: Path, locked_output: Path, tmp_path: Path) -> None:
    job = config(tmp_path, two_input_onnx, dataset, locked_output,
                 preprocess=[{"kind": f"{MODULE}:prep", "columns": ["uid"], "inputs": ["meta"]}])
    marker = tmp_path / "imported"
    result = run(["--config", str(job), "--allow-user-code"], marker)
    # Past the check, the function is imported while the job is prepared; then the lock refuses.
    assert "is locked by another job" in result.stderr, result.stderr
    assert marker.exists()


def test_functions_named_on_the_command_line_need_no_flag(
        two_input_onnx: Path, dataset: Path, locked_output: Path, tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    result = run(["--model", str(two_input_onnx), "--input", str(dataset), "--output",
                  str(locked_output), "--column", "image=img", "--backend", "onnxruntime",
                  "--preprocess", f"meta={MODULE}:prep", "--preprocess-columns", "uid"], marker)
    assert "is locked by another job" in result.stderr, result.stderr
    assert marker.exists()


def test_a_config_function_the_command_line_replaces_is_not_imported(
        two_input_onnx: Path, dataset: Path, locked_output: Path, tmp_path: Path) -> None:
    """--postprocess replaces the config's postprocessors: the config's function never runs."""
    job = config(tmp_path, two_input_onnx, dataset, locked_output,
                 postprocess=[{"kind": f"{MODULE}:post"}])
    marker = tmp_path / "imported"
    result = run(["--config", str(job), "--postprocess", "raw"], marker)
    assert "is locked by another job" in result.stderr, result.stderr
    assert not marker.exists()
