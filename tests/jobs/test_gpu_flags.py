"""The GPU actors' flags: --slots (batches in flight), --concurrent-batches (executing at once)
and --readers (row-group readers)."""

from __future__ import annotations

import pytest

from jobs.spec import spec_from_args
from workers.errors import SpecError

BASE = ["--model", "m.onnx", "--input", "in/", "--output", "out/"]


def test_defaults_and_flags() -> None:
    spec = spec_from_args(BASE)
    assert (spec.slots, spec.concurrent_batches, spec.readers) == (3, 2, None)  # jobs.resources
    spec = spec_from_args([*BASE, "--slots", "3", "--concurrent-batches", "1", "--readers", "12"])
    assert (spec.slots, spec.concurrent_batches, spec.readers) == (3, 1, 12)


@pytest.mark.parametrize("flag", ["slots", "readers", "concurrent-batches"])
def test_zero_is_refused(flag: str) -> None:
    name = flag.replace("-", "_")
    with pytest.raises(SpecError, match=f"{name} must be an integer >= 1, got 0"):
        spec_from_args([*BASE, f"--{flag}", "0"])
