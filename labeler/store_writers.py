"""Shard writes in their own processes, so the work unit's process keeps the GIL for its device loop.

A shard's store write (`LabelerStore.write_shard`: validation, then zarr's sharded chunk writes, which run
through zarr's one event-loop thread) costs about 0.25 CPU-seconds of mostly Python per 143-image shard of
FAN-S labels. In the work unit's process those writes held the GIL for a large part of the time, and the
device loop, whose kernel launches the device waits for, got the rest (docs/benchmarks.md, "GPU node").
`StoreWriters(n)` runs the writes in n spawned processes, each with the store open once, at a lower priority
(`labeler.worker_priority`); the shard's caller blocks on its own write as before, and an error in the
child comes back as itself (an `InvalidLabels`, a `ShardConflict`, ...). `StoreWriters(0)` writes in the
caller's thread (CPU machines, where the teacher takes the cores, and tests).

`done` is still set last, by the process that wrote the rows: a writer killed mid-write leaves its shard
undone (relabelled by the next run), and the write fails with a message saying so; the next write starts
fresh writer processes. Writers end with the process that started them, even when it is SIGKILLed.
"""
from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from labeler.errors import LabelerError
from labeler.parent_watch import exit_with_parent
from labeler.worker_priority import lower_worker_priority

_OPEN: dict[str, Any] = {}  # in a writer process: the labeler's store, opened once by `_open`


class StoreWriteFailed(LabelerError):
    """A store writer process died during a shard's write; the shard stays undone."""


def _open(store_path: str, labeler_name: str) -> None:
    from labelstore import LabelStore

    lower_worker_priority()
    exit_with_parent()  # a writer of a killed work unit would otherwise wait for work forever
    _OPEN["labels"] = LabelStore.open(store_path, mode="r+").labeler(labeler_name)


def _write(shard_index: int, fields: dict) -> None:
    _OPEN["labels"].write_shard(shard_index, **fields)


def _ready() -> bool:
    return "labels" in _OPEN


class StoreWriters:
    """`write(shard_index, **write_shard arguments)` → the shard written, in a writer process (or in this thread
    when `processes` is 0, through `labels`, the caller's own `LabelerStore`)."""

    def __init__(self, store_path: str, labeler_name: str, processes: int, labels: Any = None):
        if processes < 0:
            raise ValueError(f"store writer processes must be >= 0, got {processes}")
        if processes == 0 and labels is None:
            raise ValueError("StoreWriters(0) writes in the caller's thread and needs its LabelerStore (labels=)")
        self.store_path, self.labeler_name, self.processes, self.labels = str(store_path), labeler_name, processes, labels
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the writer processes now (and open the store in each) instead of at the first write."""
        if self.processes:
            pool = self._executor()
            for future in [pool.submit(_ready) for _ in range(self.processes)]:
                future.result()

    def write(self, shard_index: int, **fields: Any) -> None:
        if not self.processes:
            self.labels.write_shard(shard_index, **fields)
            return
        pool = self._executor()
        try:
            pool.submit(_write, shard_index, fields).result()
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:  # the next write starts new processes
                    self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise StoreWriteFailed(f"a store writer process of {self.store_path} died while shard {shard_index} was "
                                   f"being written; the shard stays undone (the next run labels it)") from None

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # spawn: the work unit's process may hold a CUDA context, which a forked child must not inherit
                self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_open, initargs=(self.store_path, self.labeler_name))
            return self._pool
