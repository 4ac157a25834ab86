"""Where a work unit's wall time goes: host timers for CPU stages, CUDA events for device stages.

Device stages (copy, render, forward with its top-k) are queued asynchronously, so a host timer around them
would measure only the launch. On CUDA each one is bracketed by a pair of events on the stream it
runs on and the pairs are summed after the shard (one sync, no stall per batch); on CPU the work is
synchronous and a host timer is exact. Host stages that several threads run at once (decode) add
their busy seconds, so shares can exceed 100 % of the wall time.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

import torch

from labeler.thread_clock import ZERO, thread_times

PHASES = ("read", "decode", "pin", "decode_wait", "copy", "render", "forward", "result_wait", "file", "write")
SIDE_PHASES = ("copy", "render")  # on a GPU: the side stream, beside the previous batch's forward
COMPUTE_PHASES = ("forward",)  # on a GPU: the compute stream (on a CPU all three run one after the other)
DEVICE_PHASES = SIDE_PHASES + COMPUTE_PHASES  # queued on the device: timed by events, their issue by the host


class StageClock:
    """Seconds per phase; `resolve()` folds in the device events recorded so far."""

    def __init__(self, device: torch.device):
        self.seconds = {p: 0.0 for p in PHASES}
        # Host seconds spent issuing each device phase: when they approach the phase's device seconds, the
        # device ran as fast as the host could queue its work (host-bound), not as fast as it computes.
        self.issue_seconds = {p: 0.0 for p in DEVICE_PHASES}
        # The longest single issue of each: a one-off (a compile in the first batch) or a steady cost per batch.
        self.issue_max = {p: 0.0 for p in DEVICE_PHASES}
        # The device loop's own host work (issuing each batch, filing its results; its waits left out): the
        # loop thread's wall, CPU and run-queue seconds (labeler/thread_clock.py). Wall well above CPU means the
        # thread was not running: waiting for a free core, or asleep on the GIL held by another thread.
        self.loop = ZERO
        # When the first batch of a run was launched and its last batch filed (perf_counter; `reset_span`).
        self.first_launch: float | None = None
        self.last_filed: float | None = None
        self._cuda = device.type == "cuda"
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._lock = threading.Lock()

    def add(self, phase: str, seconds: float) -> None:
        with self._lock:
            self.seconds[phase] += seconds

    @contextlib.contextmanager
    def host(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - start)

    @contextlib.contextmanager
    def loop_work(self) -> Iterator[None]:
        """Count the block as the device loop's host work (this thread's wall, CPU and run-queue time)."""
        start = thread_times()
        try:
            yield
        finally:
            took = thread_times().since(start)
            with self._lock:
                self.loop = self.loop + took

    def batch_launched(self) -> None:
        if self.first_launch is None:
            self.first_launch = time.perf_counter()

    def batch_filed(self) -> None:
        self.last_filed = time.perf_counter()

    def reset_span(self) -> None:
        """Forget the first launch, the last filing and the longest issues (a bench starts its timed run here)."""
        self.first_launch = self.last_filed = None
        with self._lock:
            self.issue_max = {p: 0.0 for p in DEVICE_PHASES}

    @contextlib.contextmanager
    def device(self, phase: str, stream: "torch.cuda.Stream | None" = None) -> Iterator[None]:
        if not self._cuda:  # synchronous: the host time is the phase's time, issue included
            before = self.seconds[phase]
            with self.host(phase):
                yield
            with self._lock:
                took = self.seconds[phase] - before
                self.issue_seconds[phase] += took
                self.issue_max[phase] = max(self.issue_max[phase], took)
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        issued = time.perf_counter()
        try:
            yield
        finally:
            end.record(stream)
            took = time.perf_counter() - issued
            with self._lock:
                self.issue_seconds[phase] += took
                self.issue_max[phase] = max(self.issue_max[phase], took)
                self._events.append((phase, start, end))

    def resolve(self, block: bool = True) -> dict[str, float]:
        """Add the durations of the device events recorded so far and forget them; returns `seconds`.

        `block=False` folds in only the events that have already happened (the device loop calls it after
        every batch, so a long job keeps a bounded list and never stalls on work still queued)."""
        with self._lock:
            events, self._events = self._events, []
        keep = []
        for phase, start, end in events:
            if block:
                end.synchronize()
            elif not end.query():
                keep.append((phase, start, end))
                continue
            self.add(phase, start.elapsed_time(end) / 1000.0)
        if keep:
            with self._lock:
                self._events[:0] = keep
        return self.seconds
