"""Decode workers: shards decoded in parallel, each by one worker, chunks streamed back in order.

Processes on a GPU node: reading a tar, decoding, drawing view params and packing are Python around C
calls, and in threads of one process they serialise on the GIL (measured: 16 decode threads on a
16-core node kept only ~2.4 cores busy). Each decode process takes a whole shard (`DecodeJob`) and
sends its chunks back through its own pipe; their pixels were packed in shared memory
(`pack_flat(shared=True)`), so only a handle crosses the process boundary. Processes are spawned once
and kept for the work unit's life; they import numpy, Pillow and torch (CPU), never CUDA.

Threads on CPU-only machines (laptops, CI, the demo): there the teacher itself takes the cores, a job
runs in a thread of the caller's process with its own small decode thread pool, and nothing is spawned.

Flow control: a process may run at most `max_chunks_ahead` chunks ahead of the consumer of its job (a
semaphore per process), so a fast decoder never fills memory with a shard's pixels. A process that dies
(killed, out of memory, a crash in a decoder) fails the job it was running with a message saying so,
and is replaced.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing import connection as mp_connection
from typing import Any, Iterator

import torch.multiprocessing as mp

from labeler.decode_chunks import DecodeJob, DecodedChunk, decode_chunks
from labeler.errors import LabelerError
from labeler.jpeg_decode import fast_jpeg_decoder_in_use
from labeler.parent_watch import exit_with_parent
from labeler.worker_priority import lower_worker_priority

DECODE_POOLS = ("auto", "process", "thread")
_POLL_S = 0.2


class DecodeFailed(LabelerError):
    """A shard's decode stopped: its reader or decoder raised, or its decode process died."""


def default_decode_workers() -> int:
    """The CPUs this process may use (its affinity mask: container and taskset limits included)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS: no affinity API
        return max(1, os.cpu_count() or 1)


def resolve_decode_workers(setting: int) -> int:
    """`decode_workers` setting → number of workers (0 = `default_decode_workers()`)."""
    if setting < 0:
        raise ValueError(f"decode_workers must be >= 0 (0 = one per CPU this worker owns), got {setting}")
    return setting or default_decode_workers()


def resolve_decode_pool(setting: str, device_type: str) -> str:
    """`decode_pool` setting → "process" or "thread" (auto: processes on CUDA, threads elsewhere)."""
    if setting not in DECODE_POOLS:
        raise ValueError(f"decode_pool must be one of {DECODE_POOLS}, got {setting!r}")
    if setting == "auto":
        return "process" if device_type == "cuda" else "thread"
    return setting


def _process_main(worker: int, conn, credits) -> None:
    """A decode process: take jobs from its pipe until told to stop; stream each job's chunks (or its
    error) back on the same pipe. One pipe per process: a process that dies mid-message breaks only its own."""
    import torch

    torch.set_num_threads(1)  # pixels are packed with numpy; torch threads would only contend
    lower_worker_priority()  # the device loop's launches come first when the cores are all busy
    exit_with_parent()  # blocked on a credit or a job, a process of a killed work unit would wait forever
    fast_jpeg_decoder_in_use()  # the JPEG decoder's import and probe now, not inside the first shard
    conn.send(("ready", None))  # imports done: `wait_ready` returns once every process got here
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the work unit's process is gone
            return
        if job is None:
            return
        try:
            for chunk in decode_chunks(job):
                credits.acquire()
                conn.send(("chunk", chunk))
            conn.send(("end", None))
        except (BrokenPipeError, EOFError):
            return
        except Exception as e:  # noqa: BLE001 - the job's consumer raises it, naming the shard
            conn.send(("error", f"{type(e).__name__}: {e}"))


@dataclass
class _Job:
    job: DecodeJob
    out: "queue.Queue"
    # The flow-control semaphore of the process decoding it (None: a thread job, or not taken yet). Held by the
    # job, not looked up by worker: a replaced process gets a new semaphore, which the dead one's chunks must
    # not credit.
    credits: Any = None
    cancelled: bool = False  # the consumer stopped early (a thread job stops; a process job is drained)
    finished: bool = False  # its end or error was consumed


class DecodeWorkers:
    """`submit(job)` → an iterator of the shard's chunks, in order; many jobs run at once (one per worker)."""

    def __init__(self, workers: int, pool: str = "thread", max_chunks_ahead: int = 4):
        if pool not in ("process", "thread"):
            raise ValueError(f"DecodeWorkers pool must be 'process' or 'thread', got {pool!r}")
        self.workers, self.pool = int(workers), pool
        self.max_chunks_ahead = max(1, int(max_chunks_ahead))
        self._ids = itertools.count()
        self._jobs: dict[int, _Job] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._procs: list = []
        self._waiting: deque[int] = deque()  # process pool: submitted jobs no process has taken yet
        self._ready: set[int] = set()
        self._ready_changed = threading.Condition(self._lock)
        if pool == "process":
            self._ctx = mp.get_context("spawn")  # never fork a process that holds a CUDA context and threads
            self._conns: list = [None] * self.workers
            self._credits: list = [None] * self.workers
            self._busy: list[int | None] = [None] * self.workers  # job id each process is decoding
            self._procs = [None] * self.workers
            for w in range(self.workers):
                self._start(w)
            self._dispatcher = threading.Thread(target=self._dispatch, name="stl-decode-dispatch", daemon=True)
            self._dispatcher.start()

    def _start(self, worker: int) -> None:
        ours, theirs = self._ctx.Pipe()
        self._credits[worker] = self._ctx.Semaphore(self.max_chunks_ahead)
        proc = self._ctx.Process(target=_process_main, args=(worker, theirs, self._credits[worker]),
                                 name=f"stl-decode-{worker}", daemon=True)
        proc.start()
        theirs.close()
        self._conns[worker], self._procs[worker], self._busy[worker] = ours, proc, None

    # --- submitting and consuming ---------------------------------------------------------------------
    def submit(self, job: DecodeJob) -> Iterator[DecodedChunk]:
        if self._closed:
            raise DecodeFailed("decode workers are closed")
        job_id = next(self._ids)
        entry = _Job(job, queue.Queue(maxsize=0 if self.pool == "process" else self.max_chunks_ahead))
        with self._lock:
            self._jobs[job_id] = entry
            if self.pool == "process":
                self._waiting.append(job_id)
                self._assign()
        if self.pool != "process":
            threading.Thread(target=self._run_thread, args=(job_id, entry), name=f"stl-decode-job-{job_id}",
                             daemon=True).start()
        return self._consume(job_id, entry)

    def _consume(self, job_id: int, entry: _Job) -> Iterator[DecodedChunk]:
        try:
            while True:
                kind, payload = entry.out.get()
                if kind == "chunk":
                    if entry.credits is not None:
                        entry.credits.release()  # the process may decode one more chunk
                    yield payload
                elif kind == "end":
                    entry.finished = True
                    return
                else:
                    entry.finished = True
                    raise DecodeFailed(payload)
        finally:
            entry.cancelled = True
            with self._lock:
                never_started = job_id in self._waiting
                if never_started:  # no process took it yet: it simply never runs
                    self._waiting.remove(job_id)
            if entry.finished or never_started:
                self._forget(job_id)
            else:  # abandoned mid-shard: drain what is still coming so its worker moves on
                threading.Thread(target=self._drain, args=(job_id, entry), daemon=True).start()

    def _drain(self, job_id: int, entry: _Job) -> None:
        # Until the job's end or error: a chunk dropped without giving its credit back would stall its process.
        while not self._closed:
            try:
                kind, _ = entry.out.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if kind == "chunk" and entry.credits is not None:
                entry.credits.release()
            if kind != "chunk":
                break
        self._forget(job_id)

    def _forget(self, job_id: int) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    # --- thread pool ----------------------------------------------------------------------------------
    def _run_thread(self, job_id: int, entry: _Job) -> None:
        try:
            for chunk in decode_chunks(entry.job):
                while not entry.cancelled:
                    try:
                        entry.out.put(("chunk", chunk), timeout=_POLL_S)
                        break
                    except queue.Full:
                        continue
                if entry.cancelled:
                    break
            entry.out.put(("end", None))
        except Exception as e:  # noqa: BLE001 - the consumer raises it
            entry.out.put(("error", f"{type(e).__name__}: {e}"))

    # --- process pool: hand out jobs, route results, watch for dead processes ----------------------------
    def _assign(self) -> None:
        """Give waiting jobs to idle processes (caller holds the lock)."""
        for w in range(self.workers):
            if not self._waiting:
                return
            if self._busy[w] is None and self._procs[w].is_alive():
                job_id = self._waiting.popleft()
                entry = self._jobs.get(job_id)
                if entry is None:
                    continue
                entry.credits, self._busy[w] = self._credits[w], job_id
                self._conns[w].send(entry.job)

    def _dispatch(self) -> None:
        while not self._closed:
            with self._lock:
                conns = {self._conns[w]: w for w in range(self.workers)}
                sentinels = {self._procs[w].sentinel: w for w in range(self.workers)}
            ready = mp_connection.wait(list(conns) + list(sentinels), timeout=_POLL_S)
            dead: set[int] = set()
            for r in ready:
                if r in sentinels:
                    dead.add(sentinels[r])
                    continue
                try:
                    kind, payload = r.recv()
                except (EOFError, OSError):  # its end of the pipe closed: the process is gone
                    dead.add(conns[r])
                    continue
                self._route(conns[r], kind, payload)
            for w in dead:
                if self._closed:
                    return
                self._replace(w)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until every decode process has started and imported what it needs (threads: at once)."""
        if self.pool != "process":
            return
        with self._ready_changed:
            if not self._ready_changed.wait_for(lambda: len(self._ready) == self.workers, timeout=timeout):
                raise DecodeFailed(f"only {len(self._ready)} of {self.workers} decode processes started within "
                                   f"{timeout:g} s")

    def _route(self, worker: int, kind: str, payload) -> None:
        if kind == "ready":
            with self._ready_changed:
                self._ready.add(worker)
                self._ready_changed.notify_all()
            return
        with self._lock:
            job_id = self._busy[worker]
            entry = self._jobs.get(job_id) if job_id is not None else None
            if kind != "chunk":
                self._busy[worker] = None
                self._assign()
        if entry is not None:
            entry.out.put((kind, payload))

    def _replace(self, worker: int) -> None:
        """A decode process died: route what it sent before dying, fail the job it was still decoding, and
        start a new process in its place."""
        conn, proc = self._conns[worker], self._procs[worker]
        while True:
            try:
                if not conn.poll():
                    break
                kind, payload = conn.recv()
            except (EOFError, OSError):
                break
            self._route(worker, kind, payload)
        proc.join(timeout=1)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=1)
        with self._lock:
            if self._closed:
                return
            job_id = self._busy[worker]
            entry = self._jobs.get(job_id) if job_id is not None else None
            conn.close()
            self._ready.discard(worker)
            self._start(worker)
            self._assign()
        if entry is not None:
            entry.out.put(("error", f"decode process {proc.name} died (exit code {proc.exitcode}) while decoding "
                                    f"{entry.job.url}"))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.pool != "process":
            return
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        deadline = time.monotonic() + 5
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
        self._dispatcher.join(timeout=2)
        for conn in self._conns:
            conn.close()

    def __del__(self) -> None:  # a work unit dropped without close(): do not leave processes behind
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

