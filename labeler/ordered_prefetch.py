"""An ordered thread-pool map: fn(item) computed a few items ahead, results in input order.

Decoding one shard on a CPU-only machine uses it (`labeler.decode_chunks`): Pillow releases the GIL
while it decodes and resamples, so a few threads keep a few cores busy without any process start.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator


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
