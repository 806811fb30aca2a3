"""Shared by the fault tests: the job spec, reading parts, and the exactly-once check."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from jobs.output import PART_RE
from jobs.spec import JobSpec

REPO = str(Path(__file__).resolve().parents[2])
PART = PART_RE  # the runner's own pattern: parts only, any naming version


def spec_for(model: str, data: str, out: str, **kw: Any) -> JobSpec:
    """The two-input model over the test dataset: 2 workers, shards of 240 rows."""
    settings: dict[str, Any] = dict(
        model=model, input=data, output=out, columns=(("image", "img"), ("meta", "features")),
        keep=("uid", "name"), batch_size=64, rows_per_shard=240, backend="onnxruntime",
        workers=2, progress=False, max_retries=1)
    settings.update(kw)
    return JobSpec(**settings)


def part_names(url: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Names of the parts in OUTPUT (nothing else)."""
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    fs.invalidate_cache()
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []
    return sorted(n for n in names if PART.match(n))


def read_parts(url: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    names = part_names(url, storage_options)
    return ds.dataset([f"{path.rstrip('/')}/{n}" for n in names], filesystem=fs,
                      format="parquet").to_table()


def read_files(paths: list[str], storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    tables = []
    for p in paths:
        fs, path = fsspec.core.url_to_fs(p, **dict(storage_options or {}))
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables)


def manifest(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    fs.invalidate_cache()
    value: dict[str, Any] = json.loads(fs.cat_file(f"{path.rstrip('/')}/_manifest.json"))
    return value


def reference(model: bytes, source: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """ONNX Runtime's logits and score for the source rows, computed directly."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    image = source.column("img").combine_chunks().to_numpy_ndarray()
    meta = np.stack(source.column("features").to_numpy(zero_copy_only=False)).astype(np.float32)
    logits, score = session.run(["logits", "score"], {"image": image, "meta": meta})
    return logits, score[:, 0]


def check_exactly_once(model: bytes, source: pa.Table, result: pa.Table) -> None:
    """Every input row exactly once (no row lost, none duplicated), outputs equal ONNX Runtime's.

    NaN and inf in the inputs must come out where ONNX Runtime puts them.
    """
    uids = result.column("uid").to_numpy()
    assert len(uids) == len(np.unique(uids)), "duplicated rows in the output"
    assert sorted(uids.tolist()) == sorted(source.column("uid").to_pylist()), "rows lost"
    source, result = source.sort_by("uid"), result.sort_by("uid")
    assert result.column("name").equals(source.column("name"))
    logits, score = reference(model, source)
    got = result.column("logits").combine_chunks().to_numpy_ndarray()
    np.testing.assert_allclose(got, logits, rtol=1e-5, atol=1e-4, equal_nan=True)
    np.testing.assert_allclose(result.column("score").to_numpy(), score, rtol=1e-5, atol=1e-4,
                               equal_nan=True)


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a `python -m jobs.run` subprocess: this one's, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=REPO, **extra)
    return env


def start_cli(args: list[str], env: Mapping[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "jobs.run", *args], cwd=REPO, env=dict(env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def processes_with(marker: str) -> list[int]:
    """Pids of live processes whose environment holds `marker` (a test's own unique value).

    Only processes a test started carry it, so these are the only ones it may wait on or kill.
    """
    found = []
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def kill_marked(marker: str) -> None:
    """SIGKILL every process that carries `marker` (the Ray a killed test driver left)."""
    for pid in processes_with(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_gone(marker: str, timeout: float) -> bool:
    """Wait (bounded) for the processes carrying `marker` to exit; True when none is left.

    Polls /proc: there is no event for "a process I did not spawn exited".
    """
    deadline = time.monotonic() + timeout
    while processes_with(marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True
