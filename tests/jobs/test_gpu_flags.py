"""The GPU actors' flags: --slots (batches in flight) and --readers (row-group readers)."""

from __future__ import annotations

import pytest

from jobs.spec import spec_from_args
from workers.errors import SpecError

BASE = ["--model", "m.onnx", "--input", "in/", "--output", "out/"]


def test_defaults_and_flags() -> None:
    spec = spec_from_args(BASE)
    assert (spec.slots, spec.readers) == (2, 4)
    spec = spec_from_args([*BASE, "--slots", "3", "--readers", "12"])
    assert (spec.slots, spec.readers) == (3, 12)


@pytest.mark.parametrize("flag", ["slots", "readers"])
def test_zero_is_refused(flag: str) -> None:
    with pytest.raises(SpecError, match=f"{flag} must be an integer >= 1, got 0"):
        spec_from_args([*BASE, f"--{flag}", "0"])
