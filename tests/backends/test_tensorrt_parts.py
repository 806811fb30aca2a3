"""The TensorRT backend's parts that need neither TensorRT nor a GPU: choosing a profile."""

from __future__ import annotations

import re

import pytest

from workers.backends.tensorrt import choose_profile
from workers.errors import BackendError


def test_the_profile_holding_the_batch_is_chosen() -> None:
    profiles = [(1, 8), (9, 64)]
    assert choose_profile(profiles, 1) == (0, 1)
    assert choose_profile(profiles, 8) == (0, 8)
    assert choose_profile(profiles, 9) == (1, 9)
    assert choose_profile(profiles, 64) == (1, 64)


def test_a_batch_below_every_minimum_is_padded_to_the_nearest() -> None:
    assert choose_profile([(16, 32), (8, 12)], 3) == (1, 8)
    assert choose_profile([(4, 4)], 1) == (0, 4)
    # between profiles: the next profile up, padded
    assert choose_profile([(1, 4), (16, 32)], 9) == (1, 16)


def test_a_batch_above_every_profile_is_refused() -> None:
    with pytest.raises(BackendError, match=re.escape(
            "a batch of 65 rows is larger than every optimization profile of the plan (batch "
            "rows [[1, 8], [9, 64]]); lower --batch-size or rebuild the plan")):
        choose_profile([(1, 8), (9, 64)], 65)
