"""Running an iterator on a background thread a bounded number of items ahead of its consumer,
and mapping a function over an iterator on a few threads with the results in order."""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")
_DONE = object()


class Prefetcher(Generic[T]):
    """Runs an iterator on a background thread, at most `depth` items ahead of the consumer.

    The producer's exception is re-raised in the consumer at the point it happened; closing
    early stops the producer at its next item.
    """

    def __init__(self, make: Callable[[], Iterator[T]], depth: int) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make,), daemon=True,
                                        name="prefetch")
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, make: Callable[[], Iterator[T]]) -> None:
        try:
            for item in make():
                if not self._put(item):
                    return
        except BaseException as exc:  # forwarded to the consumer
            self._put(exc)
            return
        self._put(_DONE)

    def __iter__(self) -> Iterator[T]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ordered_map(fn: Callable[[T], R], items: Iterator[T], depth: int) -> Iterator[R]:
    """`fn` of each item, in the items' order, computed on `depth` threads with at most `depth`
    items in flight (`depth` <= 1: on the calling thread, one at a time).

    Items are taken from `items` on the calling thread. An exception from `fn` is raised where
    its result would have been yielded; closing early waits for the calls already running.
    """
    if depth <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(depth, thread_name_prefix="ordered") as pool:
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
