"""CPU decode off the device's critical path: an ordered thread pool and a background producer.

Threads, not processes: Pillow releases the GIL while it decodes and resamples, so threads scale with
cores without pickling images between processes; the pool's size is a setting (`decode_threads`,
0 = every CPU this process may run on, i.e. what a Ray worker was given on its node).
"""
from __future__ import annotations

import os
import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator


def default_decode_threads() -> int:
    """The CPUs this process may use (its affinity mask: container and taskset limits included)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS: no affinity API
        return max(1, os.cpu_count() or 1)


def resolve_decode_threads(setting: int) -> int:
    """`decode_threads` setting → pool size (0 = `default_decode_threads()`)."""
    if setting < 0:
        raise ValueError(f"decode_threads must be >= 0 (0 = one per CPU this worker owns), got {setting}")
    return setting or default_decode_threads()


def ordered_prefetch(fn: Callable[[Any], Any], items: Iterable[Any], threads: int, depth: int) -> Iterator[Any]:
    """fn(item) for each item, in order, computed up to `depth` items ahead on a thread pool."""
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="stl-decode")
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_END = object()


class BackgroundIter:
    """Runs a generator on its own thread, up to `depth` items ahead; re-raises its error in the consumer.

    The consumer (the device loop) then only waits when the producer is behind; how long it waited is
    the "decode wait" of the work unit's timings. `close()` stops the producer and joins it.
    """

    def __init__(self, items: Iterable[Any], depth: int = 2, name: str = "stl-batches"):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), name=name, daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterable[Any]) -> None:
        it = iter(items)
        try:
            for item in it:
                if not self._put(item):
                    break
            else:
                self._put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(e)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
