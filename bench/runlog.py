"""A benchmark run's files: `NAME[_TAG].log` (every line timestamped, echoed to stdout), .json, .md."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TextIO


class RunLog:
    """Call it with a message to log it; `path(".json")` names the run's other outputs."""

    def __init__(self, out: Path, name: str, tag: str = "") -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.stem = f"{name}_{tag}" if tag else name
        self.file: TextIO = open(self.path(".log"), "w")  # noqa: SIM115 - open for the whole run

    def path(self, suffix: str) -> Path:
        return self.out / f"{self.stem}{suffix}"

    def __call__(self, message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {message}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
