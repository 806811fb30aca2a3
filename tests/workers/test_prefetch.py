"""`ordered_map`: results in the items' order, a bounded number in flight, errors in place."""

from __future__ import annotations

import random
import threading
import time

import pytest

from workers.prefetch import ordered_map


def test_ordered_map_keeps_the_order_of_items_that_finish_out_of_order() -> None:
    delays = [random.Random(i).uniform(0, 0.01) for i in range(40)]

    def slow_square(i: int) -> int:
        time.sleep(delays[i])
        return i * i

    assert list(ordered_map(slow_square, iter(range(40)), 4)) == [i * i for i in range(40)]


def test_ordered_map_runs_at_most_depth_calls_at_once_and_inline_at_depth_one() -> None:
    lock = threading.Lock()
    running, most, threads = 0, 0, set()

    def track(i: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            threads.add(threading.get_ident())
        time.sleep(0.002)
        with lock:
            running -= 1
        return i

    assert list(ordered_map(track, iter(range(30)), 3)) == list(range(30))
    assert 1 < most <= 3
    threads.clear()
    assert list(ordered_map(track, iter(range(5)), 1)) == list(range(5))
    assert threads == {threading.get_ident()}


def test_ordered_map_raises_where_the_failed_item_would_have_been() -> None:
    def fail_at_seven(i: int) -> int:
        if i == 7:
            raise ValueError("item 7 is bad")
        return i

    got = []
    with pytest.raises(ValueError, match="item 7 is bad"):
        for value in ordered_map(fail_at_seven, iter(range(20)), 3):
            got.append(value)
    assert got == list(range(7))


def test_ordered_map_closed_early_takes_no_more_items() -> None:
    taken = []

    def items():
        for i in range(100):
            taken.append(i)
            yield i

    results = ordered_map(lambda i: i, items(), 3)
    assert [next(results) for _ in range(5)] == list(range(5))
    results.close()
    assert len(taken) <= 5 + 3
