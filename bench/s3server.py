"""A local S3-compatible server (moto) on 127.0.0.1, in its own process, for storage benchmarks.

Its own process so that its request handling neither holds this driver's GIL nor counts as the
pipeline's memory and CPU (the benchmark excludes its pid from the process-tree totals).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from types import TracebackType

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    """moto's server on 127.0.0.1:PORT with AWS_* set in this process (and so in Ray's workers).

    Enter it before `ray.init()`: workers inherit the environment of the raylet, which inherits
    this process's.
    """

    def __init__(self, startup_timeout: float = 60.0) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._saved: dict[str, str | None] = {}
        # Its request log, read only when it fails to start; closed and removed on exit.
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="bench-moto-", suffix=".log", delete=False)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else -1

    def __enter__(self) -> S3Server:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            # A server in another process signals readiness only by accepting connections.
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__(None, None, None)
                    raise RuntimeError(f"moto server did not start on 127.0.0.1:{self.port}; "
                                       f"see {self._log.name}") from None
                time.sleep(0.1)
        env = {"AWS_ENDPOINT_URL": self.endpoint, **CREDENTIALS}
        self._saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._log.close()
        os.unlink(self._log.name)

    def new_bucket(self, prefix: str = "bench") -> str:
        """Create a bucket; returns 's3://NAME'."""
        import s3fs

        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
        return f"s3://{name}"
