"""The actor's CPU sharing: the GIL's switch interval and the bulk work's lower priority."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator

import pytest

from workers import sched
from workers.errors import SpecError
from workers.helpers import HelperProcesses

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice: Linux")


def _thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.fixture
def restore() -> Iterator[None]:
    interval, nice = sys.getswitchinterval(), sched.helper_nice()
    yield
    sched.configure(interval * 1000.0, nice)


def test_defaults_without_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRT_BATCH_RUNNER_SWITCH_INTERVAL_MS", raising=False)
    monkeypatch.delenv("TRT_BATCH_RUNNER_HELPER_NICE", raising=False)
    assert sched.from_env() == (sched.SWITCH_INTERVAL_MS, sched.HELPER_NICE)


def test_the_variables_set_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRT_BATCH_RUNNER_SWITCH_INTERVAL_MS", "5")
    monkeypatch.setenv("TRT_BATCH_RUNNER_HELPER_NICE", "0")
    assert sched.from_env() == (5.0, 0)


@pytest.mark.parametrize(("name", "value"), [
    ("TRT_BATCH_RUNNER_SWITCH_INTERVAL_MS", "fast"), ("TRT_BATCH_RUNNER_SWITCH_INTERVAL_MS", "0"),
    ("TRT_BATCH_RUNNER_HELPER_NICE", "20"), ("TRT_BATCH_RUNNER_HELPER_NICE", "-1")])
def test_a_bad_value_names_the_variable_and_the_range(monkeypatch: pytest.MonkeyPatch,
                                                      name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SpecError, match=rf"{name}='{value}' is not a number from .* unset it"):
        sched.from_env()


def test_image_tables_default_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRT_BATCH_RUNNER_IMAGE_TABLES", raising=False)
    assert sched.image_tables_from_env() == sched.IMAGE_TABLES == 2
    monkeypatch.setenv("TRT_BATCH_RUNNER_IMAGE_TABLES", "1")
    assert sched.image_tables_from_env() == 1
    for bad in ("0", "9", "two"):
        monkeypatch.setenv("TRT_BATCH_RUNNER_IMAGE_TABLES", bad)
        with pytest.raises(SpecError, match=rf"TRT_BATCH_RUNNER_IMAGE_TABLES='{bad}' is not a "
                                            r"number from 1 to 8; unset it for the default \(2\)"):
            sched.image_tables_from_env()


def test_configure_sets_the_switch_interval(restore: None) -> None:
    sched.configure(0.5, 3)
    assert sys.getswitchinterval() == pytest.approx(0.0005)
    assert sched.helper_nice() == 3


@linux
def test_lowering_a_thread_leaves_the_others() -> None:
    before = _thread_nice()
    seen: list[int] = []

    def lowered() -> None:
        start = _thread_nice()
        sched.lower_this_thread(2)
        seen.extend([start, _thread_nice()])

    thread = threading.Thread(target=lowered)
    thread.start()
    thread.join()
    assert seen == [before, min(19, before + 2)]
    assert _thread_nice() == before


@linux
def test_preprocess_threads_run_lower(restore: None) -> None:
    import numpy as np
    import pyarrow as pa

    from workers.preprocess import ImagePrep, Preprocessor
    from workers.tensors import TensorMeta

    sched.configure(1.0, 4)
    model = {"x": TensorMeta("x", np.dtype(np.float32), (None, 8, 8, 3))}
    spec = ImagePrep(column="jpeg").resolve(model, ["x"], pa.schema([("jpeg", pa.binary())]),
                                            "input 't'")
    with Preprocessor([spec], model, threads=2) as prep:
        assert prep._pool is not None
        assert prep._pool.submit(_thread_nice).result() == min(19, _thread_nice() + 4)


@linux
def test_helper_processes_run_lower(restore: None) -> None:
    sched.configure(1.0, 3)
    helpers = HelperProcesses(1)
    try:
        assert helpers.pool().submit(os.nice, 0).result() == min(19, os.nice(0) + 3)
    finally:
        helpers.close()
