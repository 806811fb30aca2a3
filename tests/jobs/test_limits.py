"""The summary's "limited by" line, from the workers' stage times and GPU busy fractions."""

from __future__ import annotations

from typing import Any

from jobs.driver import JobReport, summary
from jobs.limits import limited_by


def gpu_worker(busy: float, read: float = 0.0, convert: float = 0.0, write: float = 0.0,
               readers: int = 16, working: float = 100.0) -> dict[str, Any]:
    return {"slots": 3, "readers": readers, "working_seconds": working,
            "gpu_busy_seconds": busy * working,
            "seconds": {"read": read, "convert": convert, "write": write}}


def test_no_line_when_the_gpu_was_busy_or_there_was_none() -> None:
    assert limited_by([gpu_worker(0.95, read=1500)]) is None
    assert limited_by([{"slots": 0, "working_seconds": 10.0, "seconds": {"read": 10.0}}]) is None
    assert limited_by([]) is None


def test_reading_a_list_column_advises_the_binary_layout() -> None:
    line = limited_by([gpu_worker(0.41, read=16 * 97.0, convert=20)], list_columns=["img"])
    assert line is not None
    assert line.startswith("limited by: reading Parquet (16 reading thread(s) busy 97% of the "
                           "time); GPU busy 41% of the workers' time")
    assert "column(s) 'img' are list or tensor columns" in line
    assert "fixed_size_binary, docs/tensor-columns.md" in line


def test_reading_other_columns_advises_more_cpus() -> None:
    line = limited_by([gpu_worker(0.5, read=4 * 90.0, readers=4)])
    assert line is not None and line.endswith("give each GPU more CPUs (--cpus-per-worker, "
                                              "--readers)")


def test_decoding_images_advises_the_gpu_decoder() -> None:
    line = limited_by([gpu_worker(0.34, read=50, convert=99.0), gpu_worker(0.36, convert=98.0)],
                      convert_is="decoding images")
    assert line is not None
    assert line.startswith("limited by: decoding images (busy 99% of the time); GPU busy 35%")
    assert "--image-decode gpu" in line


def test_decoding_on_the_gpu_advises_the_cpu_decoder() -> None:
    worker = {**gpu_worker(0.4, convert=99.0), "image_decode": "gpu"}
    line = limited_by([worker], convert_is="decoding images")
    assert line is not None
    assert line.startswith("limited by: decoding images (busy 99% of the time); GPU busy 40%")
    assert line.endswith("; the GPU decoded them, beside the engine: decode on the CPU instead "
                         "(--image-decode cpu) where each GPU has CPUs enough, or give it more "
                         "(--cpus-per-worker, --preprocess-threads)")
    # A GPU actor that sent most rows to the CPU (JPEGs at the model's size): more CPUs.
    cpu_most = {**worker, "image_rows": {"gpu": 10, "cpu": 990}}
    line = limited_by([cpu_most], convert_is="decoding images")
    assert line is not None and "--image-decode gpu" in line and "instead" not in line


def test_an_idle_gpu_with_idle_stages_says_so() -> None:
    line = limited_by([gpu_worker(0.3, read=16 * 10.0, convert=10, write=5)])
    assert line is not None and line.startswith("limited by: not the host's stages (GPU busy 30%")


def test_the_summary_prints_the_line() -> None:
    line = limited_by([gpu_worker(0.3, convert=99.0)], convert_is="decoding images")
    report = JobReport(output="out/", shards=1, committed=1, skipped=0, rows=10, seconds=1.0,
                       backend="onnxruntime", manifest={"limited_by": line})
    assert summary(report).splitlines()[1] == line
    quiet = JobReport(output="out/", shards=1, committed=1, skipped=0, manifest={"limited_by": None})
    assert len(summary(quiet).splitlines()) == 1
