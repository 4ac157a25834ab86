"""Where a training step's time goes, measured without ever waiting on the device (`stl-train bench`).

A step issues device work and moves on; nothing in the hot loop syncs. So the host's seconds per step say
only how long issuing took, unless the device is the limit: then the host runs ahead until CUDA's launch
queue is full and blocks inside some call. `DeviceLag` tells the two apart: at every step boundary it
counts the earlier boundaries' events the device has not reached yet (a non-blocking query) and records a
new one. About 0 steps behind: the device finished the last step while the host was still issuing this
one, so it waited for the host (host-bound). About 1 or more: the host is ahead (device-bound).
"""
from __future__ import annotations

import time
from collections import deque
from functools import wraps
from typing import Callable

import torch

from labeler.allocator_counts import AllocatorCounts
from labeler.thread_clock import ThreadTimes, thread_times


class HostTimer:
    """Host seconds spent inside the calls it wraps (`wrap(fn)`), summed; `reset()` starts a new window."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def wrap(self, fn: Callable) -> Callable:
        @wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1
        return timed


class DeviceLag:
    """Steps the device is behind the host, sampled at each `mark()` (a step boundary) on `device`'s current
    stream; `mean` is None on a CPU (no queue: every op has run when its call returns)."""

    def __init__(self, device: torch.device | str) -> None:
        self.enabled = torch.device(device).type == "cuda"
        self._events: deque = deque()
        self.behind = 0  # pending events summed over the marks
        self.marks = 0

    def reset(self) -> None:
        """A new window: forget the counts (events still queued stay, they are the device's real backlog)."""
        self.behind, self.marks = 0, 0

    def mark(self) -> None:
        if not self.enabled:
            return
        while self._events and self._events[0].query():  # reached by the device: drop
            self._events.popleft()
        self.behind += len(self._events)
        self.marks += 1
        event = torch.cuda.Event()
        event.record()
        self._events.append(event)

    @property
    def mean(self) -> float | None:
        if not self.enabled or not self.marks:
            return None
        return self.behind / self.marks


class StepWindow:
    """The per-step figures of one timed window, together: host seconds in the call `targets` wraps (the
    targets), the device's lag, the allocator's calls, and the loop thread's wall, CPU and run-queue seconds
    (`labeler.thread_clock`: was a host-bound loop working, waiting for a core, or asleep on the GIL?).
    `open()` at the window's start, `mark()` at each step boundary in it, `close(sync)` at its end, all from
    the loop's thread (`sync` waits for the device after the thread's times are read, before the allocator)."""

    def __init__(self, device: torch.device | str) -> None:
        self.targets = HostTimer()
        self.lag = DeviceLag(device)
        self.memory = AllocatorCounts(device)
        self.targets_s = 0.0
        self.allocator: dict | None = None
        self.loop: ThreadTimes | None = None  # the window's, once closed
        self._opened: ThreadTimes | None = None

    def open(self) -> None:
        self.targets.reset()
        self.lag.reset()
        self.memory.start()
        self._opened = thread_times()

    def mark(self) -> None:
        self.lag.mark()

    def close(self, sync: Callable[[], None]) -> None:
        self.targets_s = self.targets.seconds  # every targets call of the window has been issued
        if self._opened is not None:
            self.loop = thread_times().since(self._opened)
        sync()
        self.allocator = self.memory.delta()

    @property
    def device_lag(self) -> float | None:
        return self.lag.mean


def describe_lag(lag: float | None) -> str:
    """The lag column of the bench: steps behind and what that means."""
    if lag is None:
        return "n/a (CPU)"
    return f"{lag:.2f} ({'device-bound' if lag >= 0.5 else 'host-bound'})"

