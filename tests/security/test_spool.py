"""Issue 17, point 6: parts spooled for an object store are private and do not outlive a kill.

With object-store output an actor writes each part to a local file first (one PUT at commit).
Those files used to land in /tmp itself, mode 0644, and stayed after a SIGKILL.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pytest

from tests.faults.helpers import REPO
from tests.models import two_input_model
from workers.actor import ShardWorker
from workers.backends import BackendConfig
from workers.commit import PartWriter
from workers.types import WorkerConfig


def private_dir(path: Path) -> None:
    info = os.lstat(path)
    assert stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
    assert stat.S_IMODE(info.st_mode) == 0o700, oct(info.st_mode)


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process's temporary directory, as TMPDIR would set it (its children inherit it)."""
    base = tmp_path / "tmp"
    base.mkdir(mode=0o1777)
    base.chmod(0o1777)  # like /tmp: everyone may create files in it
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    monkeypatch.setenv("TMPDIR", str(base))
    return base


def write_part(url: str) -> tuple[PartWriter, Path]:
    writer = PartWriter(url, f"part-{'0' * 24}.parquet")
    writer.write(pa.table({"x": pa.array([1, 2, 3])}))
    return writer, Path(writer.tmp_path)


@pytest.mark.s3
def test_a_spooled_part_is_in_a_private_directory(private_tmp: Path, s3_bucket: str) -> None:
    writer, spooled = write_part(f"{s3_bucket}/out")
    assert spooled.parent != private_tmp  # not straight in the shared temporary directory
    private_dir(spooled.parent)
    writer.commit()
    assert not spooled.exists()
    assert sorted(os.listdir(private_tmp)) in ([], [f"trt-batch-runner-{os.getuid()}"])


@pytest.mark.s3
def test_an_actors_parts_spool_in_its_own_private_directory(private_tmp: Path,
                                                             s3_bucket: str) -> None:
    worker = ShardWorker(WorkerConfig(backend="onnxruntime", backend_config=BackendConfig(),
                                      output_url=f"{s3_bucket}/out", bindings=()),
                         two_input_model())
    try:
        private_dir(Path(worker.spool.path))
        private_dir(Path(worker.spool.path).parent)
        private_dir(Path(worker.spool.path).parent.parent)
        writer = PartWriter(f"{s3_bucket}/out", f"part-{'1' * 24}.parquet",
                            spool_dir=worker.spool.path)
        assert Path(writer.tmp_path).parent == Path(worker.spool.path)
        writer.abort()
    finally:
        worker.close()
    assert not Path(worker.spool.path).exists()
    assert not Path(worker.spool.path).parent.exists()


SPOOLING_ACTOR = """
import sys
from workers.spool import Spool
spool = Spool.open()
with open(f"{spool.path}/part-{'2' * 24}.parquet.{'3' * 32}", "wb") as f:
    f.write(b"PAR1 half a part")
print(spool.path, flush=True)
sys.stdin.read()  # alive until the test kills it
"""


def start_spooling_actor() -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen([sys.executable, "-c", SPOOLING_ACTOR], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_the_spool_of_a_killed_actor_is_removed_when_the_next_actor_starts(
        private_tmp: Path) -> None:
    killed, killed_spool = start_spooling_actor()
    alive, alive_spool = start_spooling_actor()
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert killed_spool.exists()  # SIGKILL runs no cleanup: the half part is left behind
        worker = ShardWorker(WorkerConfig(backend="onnxruntime", backend_config=BackendConfig(),
                                          output_url="s3://bucket/out", bindings=()),
                             two_input_model())
        worker.close()
        assert not killed_spool.exists()
        assert alive_spool.exists()  # a running actor's spool is its own
    finally:
        alive.kill()
        alive.wait()
