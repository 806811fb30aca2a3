"""Paths as typed -> one canonical form; relative local paths under `ray job submit`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from jobs.paths import canonical_url, job_submission, resolve_paths
from jobs.spec import JobSpec, spec_from_args
from workers.errors import SpecError

SUBMITTED = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(
    {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"},
     "metadata": {"job_submission_id": "raysubmit_abc", "job_name": "raysubmit_abc"}})}


def test_one_spelling_per_local_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    want = str(tmp_path / "demo-data" / "digits")
    for typed in ("demo-data/digits", "demo-data/digits/", "./demo-data/digits",
                  f"{tmp_path}/demo-data/digits/", f"{tmp_path}//demo-data/./digits",
                  f"file://{tmp_path}/demo-data/digits/"):
        assert canonical_url(typed) == want, typed
    assert canonical_url("data/*.parquet") == f"{tmp_path}/data/*.parquet"
    assert canonical_url("/") == "/"


def test_one_spelling_per_url() -> None:
    assert canonical_url("s3://bucket/in/") == "s3://bucket/in"
    assert canonical_url("s3a://bucket/in") == "s3://bucket/in"
    assert canonical_url("memory://x/y/") == "memory:///x/y"
    assert canonical_url("simplecache::s3://b/k/") == "simplecache::s3://b/k/"  # as typed
    # HTTP(S): the URL is the address, query and credentials included (redacted elsewhere).
    for url in ("https://u:pw@host:8443/m.onnx?X-Amz-Signature=abc", "http://host/dir/"):
        assert canonical_url(url) == url


def test_spec_paths_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = spec_from_args(["--model", "m.onnx", "--input", "in/", "--output", "./out/",
                           "--tokenizer", "tok.json", "--text-column", "t",
                           "--labels", "labels.txt", "--postprocess", "argmax",
                           "--plan-key-file", "keys/plan.key", "--plugins", "lib/ops.so",
                           "--plugins", "s3://b/nms.so"])
    resolved = resolve_paths(spec, environ={})
    assert (resolved.model, resolved.input, resolved.output) == (
        f"{tmp_path}/m.onnx", f"{tmp_path}/in", f"{tmp_path}/out")
    assert resolved.plan_key_file == f"{tmp_path}/keys/plan.key"
    # Actors open the plugin libraries in other directories: an absolute path means one file.
    assert resolved.plugins == (f"{tmp_path}/lib/ops.so", "s3://b/nms.so")
    assert resolved.preprocess[0].tokenizer == f"{tmp_path}/tok.json"  # type: ignore[attr-defined]
    assert resolved.postprocess[0].labels == f"{tmp_path}/labels.txt"  # type: ignore[attr-defined]


def test_job_submission_is_recognized() -> None:
    assert job_submission(SUBMITTED) == "raysubmit_abc"
    assert job_submission({"RAY_JOB_ID": "02000000"}) == "02000000"
    assert job_submission({}) is None


@pytest.mark.parametrize("flag", ["--output", "--input", "--model", "--plan-cache",
                                  "--plan-key-file", "--weights", "--plugins"])
def test_relative_path_under_job_submission_is_refused(flag: str) -> None:
    pkg = "/tmp/ray/session_x/runtime_resources/working_dir_files/_ray_pkg_0123"
    args = {"--model": "/abs/m.onnx", "--input": "/abs/in", "--output": "/abs/out"}
    if flag == "--weights":
        args["--model"] = "/abs/deploy.prototxt"
    args[flag] = "out-rel"
    spec = spec_from_args([a for kv in args.items() for a in kv])
    with pytest.raises(SpecError) as info:
        resolve_paths(spec, environ=SUBMITTED, cwd=pkg)
    assert str(info.value) == (
        f"{flag} 'out-rel' is a relative local path, but this job runs under `ray job submit` "
        "(raysubmit_abc), in Ray's temporary copy of the working directory, where it would mean "
        f"'{pkg}/out-rel' (not your path; files written there are deleted with the cluster); "
        f"pass an absolute path as the cluster's nodes see it, e.g. {flag} \"$PWD/out-rel\" "
        "expanded by the shell that runs `ray job submit`, or a URL such as s3://bucket/...")


def test_relative_tokenizer_under_job_submission_is_refused() -> None:
    spec = spec_from_args(["--model", "/m.onnx", "--input", "/in", "--output", "/out",
                           "--text-column", "t", "--tokenizer", "text/tokenizer.json"])
    with pytest.raises(SpecError, match=r"--tokenizer 'text/tokenizer\.json' is a relative local"):
        resolve_paths(spec, environ=SUBMITTED, cwd="/tmp/pkg")


def test_absolute_paths_and_urls_pass_under_job_submission() -> None:
    spec = JobSpec(model="/abs/m.onnx", input="s3://b/in/", output="/abs/out/")
    resolved = resolve_paths(spec, environ=SUBMITTED, cwd="/tmp/pkg")
    assert (resolved.input, resolved.output) == ("s3://b/in", "/abs/out")
    assert os.path.isabs(resolved.model)
