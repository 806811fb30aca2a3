"""A real `ray start --head` and `ray job submit --working-dir` of the entrypoint."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.subprocess
REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


@dataclass(frozen=True)
class Head:
    address: str  # the dashboard's, for `ray job submit`
    gcs: str  # the GCS's, for a driver's RAY_ADDRESS
    env: dict[str, str]  # holds the cluster's token


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    """A head node in its own process group (so the test stops only what it started)."""
    tmp_path = tmp_path_factory.mktemp("head")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # Ray 2.59+ turns on token auth for local clusters: start and submit with the same token.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
               RAY_USAGE_STATS_ENABLED="0")
    dashboard, gcs = free_port(), free_port()
    temp = Path("/tmp") / f"rt-{secrets.token_hex(4)}"  # short: Ray's socket paths have a limit
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
           f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
           "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp}"]
    with open(tmp_path / "head.log", "w") as log:
        head = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log,
                                start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:  # the dashboard's job API answers once the head is up
            probe = subprocess.run([RAY, "job", "list", "--address", address], env=env,
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            assert head.poll() is None, (tmp_path / "head.log").read_text()
            assert time.monotonic() < deadline, probe.stderr
            time.sleep(1)
        yield Head(address, f"127.0.0.1:{gcs}", env)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        subprocess.run(["pkill", "-9", "-g", str(head.pid)], check=False)


def test_ray_job_submit(ray_head: Head, two_input_onnx: Path, dataset: Path,
                        tmp_path: Path) -> None:
    address, env = ray_head.address, ray_head.env
    out = tmp_path / "out"
    result = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
         "python", "-m", "jobs.run", "--model", str(two_input_onnx), "--input", str(dataset),
         "--output", str(out), "--column", "image=img", "--column", "meta=features",
         "--keep", "uid", "--rows-per-shard", "240", "--backend", "onnxruntime"],
        env=env, capture_output=True, text=True, timeout=600)
    logs = result.stdout + result.stderr
    assert result.returncode == 0, logs
    assert "done: 1,500 rows" in logs and "9 committed" in logs
    assert "rows/s" in logs  # the progress lines reach the job's logs
    assert (out / "_SUCCESS").exists()
    assert pq.read_table(out).num_rows == 1500


@pytest.mark.parametrize("flag", ["--output", "--model"])
def test_relative_path_under_ray_job_submit(ray_head: Head, two_input_onnx: Path,
                                            dataset: Path, tmp_path: Path, flag: str) -> None:
    """A relative --output used to write into Ray's temporary package copy and vanish; a
    relative --model failed with that copy's path."""
    args = {"--model": str(two_input_onnx), "--input": str(dataset), "--output": str(tmp_path)}
    args[flag] = "out-rel" if flag == "--output" else "models/two_input.onnx"
    result = subprocess.run(
        [RAY, "job", "submit", "--address", ray_head.address, "--working-dir", str(REPO), "--",
         "python", "-m", "jobs.run", *[a for kv in args.items() for a in kv],
         "--column", "image=img", "--column", "meta=features", "--backend", "onnxruntime"],
        env=ray_head.env, capture_output=True, text=True, timeout=600)
    logs = result.stdout + result.stderr
    assert result.returncode != 0, logs
    # Ray prints the job's last lines again in its failure status: the same line, twice.
    errors = sorted({line for line in logs.splitlines() if line.startswith("error:")})
    assert len(errors) == 1 and "Traceback" not in logs, logs
    assert errors[0].startswith(f"error: {flag} '{args[flag]}' is a relative local path, but "
                                "this job runs under `ray job submit` (raysubmit_")
    assert "/working_dir_files/_ray_pkg_" in errors[0]
    assert f'{flag} "$PWD/{args[flag]}"' in errors[0]


def test_driver_without_the_clusters_token(ray_head: Head, two_input_onnx: Path, dataset: Path,
                                           tmp_path: Path) -> None:
    """`RAY_ADDRESS=... python -m jobs.run` on a token-authenticated cluster, without the
    token: one line naming the fix, not Ray's traceback."""
    env = {k: v for k, v in ray_head.env.items() if k != "RAY_AUTH_TOKEN"}
    env.update(RAY_ADDRESS=ray_head.gcs, HOME=str(tmp_path), PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "jobs.run", "--model", str(two_input_onnx), "--input",
         str(dataset), "--output", str(tmp_path / "out"), "--column", "image=img",
         "--column", "meta=features", "--backend", "onnxruntime"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot join the Ray cluster at RAY_ADDRESS={ray_head.gcs}: "
                           "it uses token authentication and this process has no token")
    assert "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=" in last
