"""Issue 17, point 4: credentials in URLs and storage options are never written down or printed.

A presigned `--model` URL (its signature and security token) was written to `_job.json` and
`_manifest.json` and repeated in error messages; `--storage-options` JSON on the command line
is visible in `ray job list` and the driver's logs, so options can come from a file or an
environment variable instead.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.cli import main
from jobs.driver import run_job
from jobs.spec import spec_from_args
from tests.faults.helpers import spec_for
from workers.errors import SpecError, StorageError
from workers.storage import read_bytes

SIGNATURE = "c2VjcmV0LXNpZ25hdHVyZQ"
TOKEN = "FwoGZXIvYXdzEJr-security-token"
PASSWORD = "hunter2-password"
SECRETS = (SIGNATURE, TOKEN, PASSWORD)


def presigned(base: str, name: str) -> str:
    return (f"{base.replace('http://', f'http://reader:{PASSWORD}@')}/{name}"
            f"?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature={SIGNATURE}"
            f"&X-Amz-Security-Token={TOKEN}")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass  # the test asserts on stderr


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served over HTTP on 127.0.0.1 (query strings and credentials ignored)."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def assert_no_secret(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{where} holds {secret!r}: {text[:2000]}"


def test_redact() -> None:
    from workers.redact import redact

    assert redact(f"model 'https://u:{PASSWORD}@host/m.onnx?X-Amz-Signature={SIGNATURE}' is "
                  "bad") == "model 'https://REDACTED@host/m.onnx?REDACTED' is bad"
    assert redact("(https://host/a.onnx#token=abc)") == "(https://host/a.onnx?REDACTED)"
    assert redact("simplecache::https://host/m.onnx?sig=1") == \
        "simplecache::https://host/m.onnx?REDACTED"
    assert redact(f"sftp://user:{PASSWORD}@host/data") == "sftp://REDACTED@host/data"
    # Object-store paths may hold '?' (a glob, a key): only credentials are taken out of them.
    assert redact("s3://bucket/data/part-?.parquet") == "s3://bucket/data/part-?.parquet"
    assert redact("abfs://container@account.dfs.core.windows.net/x") == \
        "abfs://container@account.dfs.core.windows.net/x"
    assert redact("/local/path?x") == "/local/path?x"
    once = redact(f"https://host/m?sig={SIGNATURE}")
    assert redact(once) == once


def test_errors_name_the_url_without_its_credentials(http_dir: tuple[Path, str]) -> None:
    _, base = http_dir
    url = presigned(base, "missing.onnx")
    with pytest.raises(StorageError) as caught:
        read_bytes(url)
    assert_no_secret(str(caught.value), "the error")
    assert f"{base.replace('http://', 'http://REDACTED@')}/missing.onnx?REDACTED" in str(
        caught.value)


def test_the_cli_prints_no_credentials(http_dir: tuple[Path, str], dataset: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str],
                                       caplog: pytest.LogCaptureFixture) -> None:
    _, base = http_dir
    with caplog.at_level(logging.DEBUG):
        code = main(["--model", presigned(base, "missing.onnx"), "--input", str(dataset),
                     "--output", str(tmp_path / "out"), "--backend", "onnxruntime"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error: model 'http://REDACTED@127.0.0.1:" in err
    assert_no_secret(err, "stderr")
    assert_no_secret(caplog.text, "the log")


@pytest.mark.ray
def test_job_files_and_lines_hold_no_credentials(ray_cluster: None, http_dir: tuple[Path, str],
                                                 two_input_onnx: Path, dataset: Path,
                                                 tmp_path: Path) -> None:
    root, base = http_dir
    (root / "model.onnx").write_bytes(two_input_onnx.read_bytes())
    out = tmp_path / "out"
    log = io.StringIO()
    report = run_job(spec_for(presigned(base, "model.onnx"), str(dataset), str(out)), log)
    assert report.exit_code == 0
    for name in ("_job.json", "_manifest.json", "_inputs.json", "_SUCCESS"):
        assert_no_secret((out / name).read_text(), name)
    assert_no_secret(log.getvalue(), "the job's lines")
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["model"]["uri"].endswith("/model.onnx?REDACTED")
    assert json.loads((out / "_job.json").read_text())["model"].startswith("http://REDACTED@")


# -- storage options from a file or the environment -------------------------------------------

OPTIONS = {"key": "AKIAEXAMPLE", "secret": "wJalrXUtnFEMI", "client_kwargs": {"region_name": "x"}}
ARGS = ["--model", "m.onnx", "--input", "s3://b/in", "--output", "s3://b/out"]


def test_storage_options_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "storage.json"
    path.write_text(json.dumps(OPTIONS))
    assert spec_from_args([*ARGS, "--storage-options-file", str(path)]).storage == OPTIONS
    assert spec_from_args([*ARGS, "--storage-options", f"@{path}"]).storage == OPTIONS
    config = tmp_path / "job.yaml"
    config.write_text(f"storage_options_file: {path}\n")
    assert spec_from_args([*ARGS, "--config", str(config)]).storage == OPTIONS
    # Inline options win over the file's, key by key.
    spec = spec_from_args([*ARGS, "--storage-options-file", str(path),
                           "--storage-options", '{"key": "OTHER"}'])
    assert spec.storage == {**OPTIONS, "key": "OTHER"}
    assert "wJalrXUtnFEMI" not in json.dumps(spec.to_json())


def test_storage_options_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    monkeypatch.setenv("TRT_BATCH_RUNNER_STORAGE_OPTIONS", json.dumps(OPTIONS))
    assert spec_from_args(ARGS).storage == OPTIONS
    path = tmp_path / "storage.json"
    path.write_text(json.dumps({"anon": True}))
    monkeypatch.delenv("TRT_BATCH_RUNNER_STORAGE_OPTIONS")
    monkeypatch.setenv("TRT_BATCH_RUNNER_STORAGE_OPTIONS_FILE", str(path))
    assert spec_from_args(ARGS).storage == {"anon": True}
    # A file named on the command line replaces the environment's, key by key.
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"anon": False}))
    assert spec_from_args([*ARGS, "--storage-options-file", str(mine)]).storage == {"anon": False}


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot read storage options file '{path}' (FileNotFoundError)"),
    ('{"key": "AKIAEXAMPLE", ', "storage options file '{path}' is not valid JSON (Expecting "),
    ('["AKIAEXAMPLE"]', "storage options file '{path}' must be a JSON object, got list"),
])
def test_a_bad_storage_options_file_is_named_without_its_contents(
        tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "storage.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SpecError) as caught:
        spec_from_args([*ARGS, "--storage-options-file", str(path)])
    assert message.format(path=path) in str(caught.value)
    assert "AKIAEXAMPLE" not in str(caught.value)
