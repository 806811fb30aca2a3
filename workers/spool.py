"""Private local directories where an actor spools parts before their single upload.

A part for an object store is written to a local file and uploaded in one PUT at commit (see
`workers.commit`). Its rows are the job's output, so the file must not be readable by other
users of the node, and a killed actor must not leave it behind for good:

- all spools live under one directory per user, `$TMPDIR/trt-batch-runner-<uid>/`, mode 0700,
  refused if someone else owns it or it is a symlink;
- each actor has its own `actor-<pid namespace>-<pid>-<start time>/<uuid>/` in it (0700),
  removed by `close()` (the uuid keeps two workers of one process apart);
- an actor that starts removes the spools of actors of its PID namespace that no longer run
  (SIGKILL runs no cleanup). Spools of other namespaces (containers sharing /tmp) are left to
  actors of those namespaces, which can tell whether their owners run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
import uuid

from workers.errors import StorageError
from workers.processes import is_running, pid_namespace, process_start

_ACTOR_DIR = re.compile(r"^actor-(\d+)-(\d+)-(\d*)$")


def spool_root(base: str | None = None) -> str:
    """This user's private directory of spools under `base` (default: the temporary directory)."""
    root = os.path.join(base or tempfile.gettempdir(), f"trt-batch-runner-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(root, 0o700)
    info = os.lstat(root)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise StorageError(
            f"spool directory '{root}' is not a directory of this user (uid {os.getuid()}), "
            "so parts written there could be read or replaced by others; remove it, or point "
            "TMPDIR at a directory only this user can write")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(root, 0o700)  # ours, but made with a permissive umask: close it
    return root


def _namespace_id() -> str:
    digits = re.sub(r"\D", "", pid_namespace())
    return digits or "0"


class Spool:
    """One actor's private spool directory; `open()` makes it and removes dead actors' ones."""

    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    def open(cls, base: str | None = None) -> Spool:
        root = spool_root(base)
        namespace = _namespace_id()
        remove_dead_spools(root, namespace)
        pid = os.getpid()
        process_dir = os.path.join(root, f"actor-{namespace}-{pid}-{process_start(pid)}")
        with contextlib.suppress(FileExistsError):  # a second worker in this process
            os.mkdir(process_dir, 0o700)
        path = os.path.join(process_dir, uuid.uuid4().hex)
        os.mkdir(path, 0o700)
        return cls(path)

    def close(self) -> None:
        """Remove the spool and whatever is left in it (parts not committed are redone)."""
        shutil.rmtree(self.path, ignore_errors=True)
        # The process's directory, once empty (another worker of this process may still spool
        # there).
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(self.path))


def remove_dead_spools(root: str, namespace: str) -> list[str]:
    """Remove the spools under `root` of actors of PID `namespace` that no longer run."""
    removed = []
    for name in os.listdir(root):
        match = _ACTOR_DIR.match(name)
        if match is None or match.group(1) != namespace:
            continue
        if not is_running(int(match.group(2)), match.group(3)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(name)
    return removed
