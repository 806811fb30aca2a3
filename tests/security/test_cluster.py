"""Issue 17, point 1: the documented cluster runs jobs only for whoever holds its token.

`cluster.yaml` started the head with `--dashboard-host=0.0.0.0` and no token authentication:
an unauthenticated `POST /api/jobs/` to port 8265 ran a command as root. Head and workers shared
one instance profile that could launch EC2 instances. The first test reads the config; the
second starts a real head with the config's own `ray start` command and tries the Jobs API with
and without the token.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
CONFIG = yaml.safe_load((REPO / "cluster.yaml").read_text())
HEAD = CONFIG["head_node_type"]


def ray_starts() -> list[str]:
    return [c for key in ("head_start_ray_commands", "worker_start_ray_commands")
            for c in CONFIG[key] if "ray start" in c]


def head_start() -> list[str]:
    command, = [c for c in CONFIG["head_start_ray_commands"] if "ray start" in c]
    return shlex.split(command)


def policy(name: str) -> dict[str, Any]:
    return json.loads((REPO / "docs" / "iam" / name).read_text())


def actions(document: dict[str, Any]) -> set[str]:
    found: set[str] = set()
    for statement in document["Statement"]:
        listed = statement["Action"]
        found |= {listed} if isinstance(listed, str) else set(listed)
    return found


def test_every_node_starts_ray_with_token_authentication() -> None:
    for command in ray_starts():
        assert shlex.split(command)[0] == "RAY_AUTH_MODE=token", command
    # Shells on the nodes (ray job submit, ray status on the head) use the token too ...
    assert any("export RAY_AUTH_MODE=token" in c for c in CONFIG["initialization_commands"])
    # ... which is the one `ray get-auth-token --generate` made, copied to every node.
    assert CONFIG["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"


def test_the_dashboard_listens_on_the_heads_loopback_only() -> None:
    flags = [a for a in head_start() if a.startswith("--dashboard-host")]
    # `ray dashboard cluster.yaml` tunnels to localhost:8265 on the head over SSH.
    assert flags == ["--dashboard-host=127.0.0.1"]
    assert "0.0.0.0" not in (REPO / "cluster.yaml").read_text()


def test_workers_have_their_own_minimal_instance_profile() -> None:
    nodes = CONFIG["available_node_types"]
    head_profile = nodes[HEAD]["node_config"]["IamInstanceProfile"]["Name"]
    worker_profiles = {n["node_config"]["IamInstanceProfile"]["Name"]
                       for name, n in nodes.items() if name != HEAD}
    assert worker_profiles == {"trt-batch-runner-worker"} and head_profile == "trt-batch-runner-head"
    worker = actions(policy("worker-policy.json"))
    assert worker and all(a.startswith("s3:") for a in worker), worker
    assert not {"s3:DeleteObject", "s3:*"} & worker
    head = policy("head-policy.json")
    passes = [s for s in head["Statement"] if "iam:PassRole" in actions({"Statement": [s]})]
    assert [s["Resource"] for s in passes] == ["arn:aws:iam::ACCOUNT_ID:role/trt-batch-runner-worker"]
    assert not any(a.endswith(":*") or a == "*" for a in actions(head))
    terminate = [s for s in head["Statement"] if "ec2:TerminateInstances" in
                 actions({"Statement": [s]})]
    assert terminate and all(s["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"]
                             == CONFIG["cluster_name"] for s in terminate)


def test_the_readme_reaches_the_cluster_through_the_tunnel() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Running on a cluster"):]
    section = section[:section.index("\n## ", 3)]
    assert "<head>:8265" not in section
    assert "ray dashboard cluster.yaml" in section and "RAY_AUTH_MODE=token" in section
    assert "docs/security.md" in section


def wait_for_job_end(address: str, env: dict[str, str]) -> None:
    """Block until the head's jobs are done (`ray job list` shows none running)."""
    for _ in range(120):
        listing = subprocess.run([RAY, "job", "list", "--address", address], env=env,
                                 capture_output=True, text=True).stdout
        if "RUNNING" not in listing and "PENDING" not in listing:
            return
        time.sleep(1)  # polling an external server's job table: no event to wait on


@pytest.mark.subprocess
def test_a_head_started_as_cluster_yaml_starts_it_refuses_unauthenticated_jobs(
        tmp_path: Path) -> None:
    token = secrets.token_hex(32)
    home = tmp_path / "head-home"  # the head node's home directory, as cluster.yaml sets it up
    (home / ".ray").mkdir(parents=True)
    if CONFIG.get("file_mounts", {}).get("/home/ubuntu/.ray/auth_token") == "~/.ray/auth_token":
        (home / ".ray" / "auth_token").write_text(token)
        (home / ".ray" / "auth_token").chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    # The user's machine: the token `ray get-auth-token --generate` made there.
    client = {**env, "HOME": str(tmp_path / "laptop"), "RAY_AUTH_MODE": "token",
              "RAY_AUTH_TOKEN": token}
    words = head_start()
    assignments = [w for w in words[:words.index("ray")] if "=" in w]
    env.update(dict(a.split("=", 1) for a in assignments))
    flags = [w for w in words[words.index("start") + 1:]
             if not w.startswith(("--autoscaling-config", "--port"))]
    dashboard = free_port()
    temp = Path("/tmp") / f"rt-{secrets.token_hex(4)}"  # short: Ray's socket paths have a limit
    cmd = [RAY, "start", *flags, "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
           f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
           f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
           "--num-cpus=1", "--num-gpus=0", f"--temp-dir={temp}"]
    with open(tmp_path / "head.log", "w") as log:
        head = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log,
                                start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    marker = tmp_path / "ran"
    try:
        deadline = time.monotonic() + 120
        while True:  # the Jobs API answers (with the token) once the head is up
            probe = subprocess.run([RAY, "job", "list", "--address", address], env=client,
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            assert head.poll() is None, (tmp_path / "head.log").read_text()
            assert time.monotonic() < deadline, probe.stderr
            time.sleep(1)
        request = urllib.request.Request(
            f"{address}/api/jobs/", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"entrypoint": f"touch {marker}"}).encode())
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
            wait_for_job_end(address, client)
            pytest.fail(f"an unauthenticated POST /api/jobs/ was accepted (ran: {marker.exists()})")
        assert refused.value.code in (401, 403)
        assert not marker.exists()
        # With the token (as `ray job submit` sends it) the same cluster runs the job.
        done = subprocess.run([RAY, "job", "submit", "--address", address, "--", "touch",
                               str(marker)], env=client, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert marker.exists()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        subprocess.run(["pkill", "-9", "-g", str(head.pid)], check=False)
