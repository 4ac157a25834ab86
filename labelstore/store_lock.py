"""The store lock: one process at a time changes a store's metadata (creation, shard table, labelers, leases).

Local stores (a path or file:// URL) use an exclusive `fcntl.flock` on `<store>/.stl-lock`: the kernel
releases it when the holder dies, so a killed driver never leaves a stale lock. Object stores (s3://,
gs://, ...) have no such lock; there the lock is a no-op and concurrent drivers must be prevented
outside (one driver per store), or use the store's conditional writes (docs/store-format.md "Concurrent
drivers"). The lock is re-entrant within a process (flock would otherwise block on itself).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from typing import Iterator

LOCK_FILE = ".stl-lock"
_held: dict[str, list] = {}  # local path → [fd, depth]
_guard = threading.RLock()


def local_path(path: str) -> str | None:
    """The file-system path of a local store, or None for a remote URL."""
    if path.startswith("file://"):
        return path[len("file://"):]
    return None if "://" in path else path


@contextlib.contextmanager
def store_lock(path: str, create_dir: bool = False) -> Iterator[None]:
    """Hold the store's exclusive lock (blocking); `create_dir` makes the store directory first."""
    local = local_path(str(path))
    if local is None:
        yield
        return
    key = os.path.abspath(local)
    with _guard:
        if key in _held:
            _held[key][1] += 1
        else:
            if create_dir:
                os.makedirs(key, exist_ok=True)
            fd = os.open(os.path.join(key, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            _held[key] = [fd, 1]
        try:
            yield
        finally:
            _held[key][1] -= 1
            if _held[key][1] == 0:
                fd = _held.pop(key)[0]
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
