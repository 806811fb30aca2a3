"""The CLI as users run it: one clear line per bad input, exit codes, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.faults.helpers import kill_marked, wait_gone
from tests.models import chain_model, chain_table, two_input_model

pytestmark = pytest.mark.subprocess
REPO = Path(__file__).resolve().parents[1]


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = str(REPO)
    return env


def run_cli(*args: str, timeout: float = 300, cwd: Path = REPO,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jobs.run", *args], cwd=cwd,
                          env=env or cli_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def job_args(two_input_onnx: Path, dataset: Path, tmp_path: Path) -> list[str]:
    return ["--model", str(two_input_onnx), "--input", str(dataset), "--output",
            str(tmp_path / "out"), "--column", "image=img", "--column", "meta=features",
            "--keep", "uid", "--rows-per-shard", "240", "--backend", "onnxruntime",
            "--workers", "2", "--no-progress"]


def replace(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


def swap(args: list[str], old: str, new: str) -> list[str]:
    return [new if a == old else a for a in args]


def one_error_line(result: subprocess.CompletedProcess[str], only: bool = True) -> str:
    """The CLI's error: exit 2, one `error:` line (the only line, unless Ray had started), no traceback."""
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.stderr
    if only:
        assert len(lines) == 1, result.stderr
    return lines[-1]


def test_nonexistent_input(job_args: list[str], tmp_path: Path) -> None:
    line = one_error_line(run_cli(*replace(job_args, "--input", str(tmp_path / "missing"))))
    assert line == f"error: input '{tmp_path / 'missing'}' does not exist; check --input " \
                   "(a Parquet file, a directory or a glob)"


def test_missing_model(job_args: list[str], tmp_path: Path) -> None:
    line = one_error_line(run_cli(*replace(job_args, "--model", str(tmp_path / "nope.onnx"))))
    assert line.startswith(f"error: model '{tmp_path / 'nope.onnx'}' cannot be read")
    assert line.endswith("check --model")


def test_file_that_is_not_onnx(job_args: list[str], tmp_path: Path) -> None:
    fake = tmp_path / "model.onnx"
    fake.write_text("definitely not a protobuf\n" * 20)
    line = one_error_line(run_cli(*replace(job_args, "--model", str(fake))))
    assert f"model '{fake}' is not an ONNX model" in line
    assert "pass a .onnx file exported by" in line


def test_unknown_column(job_args: list[str]) -> None:
    line = one_error_line(run_cli(*swap(job_args, "image=img", "image=pixels")))
    assert "column 'pixels' (for model input 'image', mapped by --column) is not in input" in line
    assert line.endswith("map it with --column image=COLUMN")


def test_column_of_the_wrong_type(job_args: list[str]) -> None:
    line = one_error_line(run_cli(*swap(job_args, "image=img", "image=uid")))
    assert "column 'uid' is int64 (one value per row), but input 'image' of the model wants " \
           "float32 [N,3,4,4]" in line


def test_bad_flag_value(job_args: list[str]) -> None:
    line = one_error_line(run_cli(*replace(job_args, "--rows-per-shard", "0")))
    assert line == "error: rows_per_shard must be an integer >= 1, got 0"


def test_tensorrt_without_gpu(job_args: list[str]) -> None:
    # Ray has to start to learn the cluster has no GPUs; nothing is reserved or written.
    line = one_error_line(run_cli(*replace(job_args, "--backend", "tensorrt")), only=False)
    assert "backend 'tensorrt' needs" in line and "--backend onnxruntime" in line


def test_corrupt_file_among_good_ones(job_args: list[str], dataset: Path, tmp_path: Path) -> None:
    (dataset / "data-002.parquet").write_bytes(b"garbage" * 100)
    result = run_cli(*job_args)
    assert result.returncode == 1, result.stderr
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "data-002.parquet" in failed[0]
    assert "not a readable Parquet file" in failed[0]
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["shards_committed"] == 6 and manifest["rows"] == 1000
    assert [f["file"].rsplit("/", 1)[-1] for f in manifest["failures"]] == ["data-002.parquet"]
    assert pq.read_table(tmp_path / "out").num_rows == 1000
    # Within --max-failed-shards the job counts as done.
    assert run_cli(*job_args, "--max-failed-shards", "1").returncode == 0


def test_files_that_are_not_parquet_are_skipped_and_counted(job_args: list[str], dataset: Path,
                                                            tmp_path: Path) -> None:
    (dataset / "README.txt").write_text("where this data came from\n")
    (dataset / "images").mkdir()
    (dataset / "images" / "digit-0000.png").write_bytes(b"\x89PNG\r\n\x1a\n not parquet")
    result = run_cli(*job_args)
    assert result.returncode == 0, result.stderr
    job_line = next(line for line in result.stderr.splitlines() if line.startswith("job: "))
    assert job_line == ("job: 3 file(s), 1,500 rows in 9 shard(s); 0 already committed "
                        "(skipped), 9 to run; 2 other file(s) skipped (not .parquet)")
    assert "failed:" not in result.stderr
    assert (tmp_path / "out" / "_SUCCESS").exists()
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert [u.rsplit("/", 1)[-1] for u in manifest["files_skipped"]] == [
        "README.txt", "digit-0000.png"]


def test_resume_does_not_depend_on_how_paths_are_spelled(job_args: list[str], dataset: Path,
                                                         tmp_path: Path) -> None:
    """A relative first run; reruns spelled with $PWD and with trailing slashes are the same job."""
    relative = replace(replace(job_args, "--input", "data"), "--output", "out")
    first = run_cli(*relative, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    for spelled in (str(dataset), f"{dataset}/", "./data/"):
        again = run_cli(*replace(replace(job_args, "--input", spelled), "--output",
                                 f"{tmp_path}/out/"), cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert "9 already committed (skipped), 0 to run" in again.stderr
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["job"]["input"] == manifest["spec"]["input"] == str(dataset)
    assert manifest["model"]["uri"] == manifest["job"]["model"] == job_args[1]
    assert manifest["spec"]["output"] == str(tmp_path / "out")


def test_output_that_is_a_file(job_args: list[str], tmp_path: Path) -> None:
    target = tmp_path / "scores.parquet"
    target.write_bytes(b"PAR1")
    line = one_error_line(run_cli(*replace(job_args, "--output", str(target))))
    assert line == (f"error: --output '{target}' is a file; --output must be a directory (it "
                    "will hold part-*.parquet, _manifest.json and _SUCCESS): pass the path of "
                    "a new or existing directory")


def test_other_job_into_output(job_args: list[str], tmp_path: Path) -> None:
    assert run_cli(*job_args).returncode == 0
    other = tmp_path / "other.onnx"
    other.write_bytes(two_input_model(seed=77))
    line = one_error_line(run_cli(*replace(job_args, "--model", str(other))))
    assert "already holds 9 part(s) of another job (model: sha256 " in line
    assert line.endswith("choose another --output, or pass --overwrite to replace them")


def test_resume_after_the_whole_job_is_killed(tmp_path: Path) -> None:
    """SIGKILL the driver and its local Ray mid-job; the rerun finishes exactly, reusing parts."""
    model = tmp_path / "chain.onnx"
    chain_model(str(model), width=256, depth=32)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        pq.write_table(chain_table(1200, seed=i, start=i * 1200), data / f"f{i}.parquet",
                       row_group_size=60)
    out = tmp_path / "out"
    args = ["--model", str(model), "--input", str(data), "--output", str(out), "--keep", "uid",
            "--rows-per-shard", "60", "--batch-size", "20", "--workers", "1",
            "--shards-in-flight", "1", "--backend", "onnxruntime", "--no-progress"]
    # Ray's actor processes leave the driver's process group: a marker in the environment,
    # unique to this test, finds every process this job started (and nothing else).
    marker = uuid.uuid4().hex
    proc = subprocess.Popen([sys.executable, "-m", "jobs.run", *args], cwd=REPO,
                            env={**cli_env(), "RESUME_TEST_MARKER": marker},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while len(list(out.glob("part-*.parquet"))) < 3 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, all at once
    kill_marked(marker)  # and its actors, which run in process groups of their own
    proc.wait()
    assert wait_gone(marker, 60), "the killed job's processes did not exit"
    assert not (out / "_SUCCESS").exists(), "the job finished before it could be killed"
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert 3 <= len(before) < 80
    for part in before:
        assert pq.read_metadata(out / part).num_rows == 60  # every visible part is complete

    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert f"{len(before)} already committed (skipped)" in result.stderr
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert len(after) == 80 and all(after[n] == t for n, t in before.items())
    table = pq.read_table(out).sort_by("uid")
    assert table.column("uid").to_pylist() == list(range(4800))
    import numpy as np
    import onnxruntime as ort

    source = pq.read_table(data).sort_by("uid")
    x = np.stack(source.column("x").to_numpy(zero_copy_only=False)).astype(np.float32)
    (want,) = ort.InferenceSession(str(model)).run(["y"], {"x": x})
    got = table.column("y").combine_chunks().to_numpy_ndarray()
    assert np.abs(got - want).max() <= 1e-4
    assert not (out / "_tmp").exists() or not list((out / "_tmp").iterdir())


# --- object storage without credentials, or with an endpoint that does not answer ---------


class ClosingServer:
    """An endpoint that accepts TCP connections and closes them at once, counting them: a
    store that is there but never answers, so every retry of every layer shows up here."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed by stop()
                return
            self.connections += 1
            conn.close()

    def stop(self) -> None:
        import socket

        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join()


def s3_case(which: str, job_args: list[str], bucket: str) -> tuple[list[str], str]:
    """The job's flags with --model, --input or --output on S3; and that URL."""
    url = {"model": f"{bucket}/models/two_input.onnx", "input": f"{bucket}/data",
           "output": f"{bucket}/out"}[which]
    return replace(job_args, f"--{which}", url), url


def no_credentials_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The CLI's environment with no AWS credentials anywhere botocore looks."""
    env = {k: v for k, v in cli_env().items()
           if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                        "AWS_PROFILE")}
    env.update(HOME=str(tmp_path), AWS_EC2_METADATA_DISABLED="true",
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_CONFIG_FILE=str(tmp_path / "none"), **extra)
    return env


@pytest.mark.s3
@pytest.mark.parametrize("which", ["model", "input", "output"])
def test_s3_without_credentials(which: str, job_args: list[str], s3_bucket: str,
                                two_input_onnx: Path, dataset: Path, tmp_path: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put(str(two_input_onnx), f"{s3_bucket}/models/two_input.onnx")
    fs.put(f"{dataset}/", f"{s3_bucket}/data/", recursive=True)
    args, url = s3_case(which, job_args, s3_bucket)
    line = one_error_line(run_cli(*args, env=no_credentials_env(tmp_path)))
    assert line.startswith(f"error: --{which} '{url}': no credentials for it (NoCredentialsError: "
                           "Unable to locate credentials); ")
    assert "AWS_ACCESS_KEY_ID" in line and "instance profile" in line and '"anon": true' in line


@pytest.mark.s3
@pytest.mark.parametrize("which", ["model", "input", "output"])
@pytest.mark.parametrize("endpoint", ["unused port", "closes connections"])
def test_s3_endpoint_that_does_not_answer(which: str, endpoint: str, job_args: list[str],
                                          tmp_path: Path) -> None:
    """One line, exit 2, after a bounded number of attempts (counted, not timed)."""
    from tests.conftest import free_port

    server = ClosingServer() if endpoint == "closes connections" else None
    port = server.port if server else free_port()
    try:
        args, url = s3_case(which, job_args, "s3://bucket")
        env = {**cli_env(), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
               "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        line = one_error_line(run_cli(*args, env=env))
    finally:
        if server:
            server.stop()
    assert line.startswith(f"error: --{which} '{url}' cannot be reached (")
    assert f"http://127.0.0.1:{port}/" in line
    assert line.endswith("nothing was started; check the store's endpoint and the network, "
                         "then rerun")
    if server:
        assert 1 <= server.connections <= 6, server.connections


@pytest.mark.parametrize("flag", ["weights", "plugins", "plan-cache"])
def test_every_store_the_job_names_is_probed_first(flag: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """--weights and --plugins are read by the driver (and --plugins by every actor), and
    --plan-cache is written: on a store that does not answer, one line before anything starts."""
    from jobs.driver import probe_paths
    from jobs.spec import JobSpec
    from tests.conftest import free_port
    from workers.errors import StorageError

    port = free_port()
    for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    url = f"s3://bucket/{flag}"
    fields = {"weights": {"model": str(tmp_path / "deploy.prototxt"), "weights": url},
              "plugins": {"plugins": (url,)}, "plan-cache": {"plan_cache": url}}[flag]
    spec = JobSpec(**{"model": str(tmp_path / "m.onnx"), "input": str(tmp_path / "in"),
                      "output": str(tmp_path / "out"), **fields})  # type: ignore[arg-type]
    with pytest.raises(StorageError) as info:
        probe_paths(spec)
    assert str(info.value).startswith(f"--{flag} '{url}' cannot be reached (")
    assert str(info.value).endswith("nothing was started; check the store's endpoint and the "
                                    "network, then rerun")


STOP_RAY = """
import json
from ray._private import ray_constants, worker
import ray
from jobs.driver import init_ray, stop_ray
init_ray()
processes = {kind: [info.process for info in infos]
             for kind, infos in worker._global_node.all_processes.items()}
monitor_at_gcs_stop = []  # the monitor's exit code when Ray goes to stop the GCS
kill = type(worker._global_node)._kill_process_type
def spy(node, kind, *args, **kwargs):
    if kind == ray_constants.PROCESS_TYPE_GCS_SERVER:
        monitor_at_gcs_stop.extend(
            p.poll() for p in processes.get(ray_constants.PROCESS_TYPE_MONITOR, []))
    return kill(node, kind, *args, **kwargs)
type(worker._global_node)._kill_process_type = spy
stop_ray()
print(json.dumps({"initialized": ray.is_initialized(),
                  "monitor": ray_constants.PROCESS_TYPE_MONITOR in processes,
                  "monitor_at_gcs_stop": monitor_at_gcs_stop,
                  "codes": {kind: [p.poll() for p in ps] for kind, ps in processes.items()}}))
"""


def test_stop_ray_kills_the_monitor_first_and_stops_every_process_it_started() -> None:
    # Ray's own order stops the GCS first; the monitor then hangs reporting to it for the 1 s
    # Ray waits before SIGKILL. stop_ray kills it first; every other process still exits.
    done = subprocess.run([sys.executable, "-c", STOP_RAY], env=cli_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["initialized"] is False
    assert got["monitor"], "a local Ray starts an autoscaler monitor; this test needs one"
    assert got["monitor_at_gcs_stop"] == [-signal.SIGKILL]  # gone before the GCS
    assert got["codes"]["monitor"] == [-signal.SIGKILL]
    assert all(code is not None for codes in got["codes"].values() for code in codes), got
