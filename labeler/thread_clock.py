"""Where a thread's wall time went: running on a CPU, waiting for a free core, or asleep.

A host-bound loop that takes longer per step than its work did was not running part of the time, and the
fix depends on why. Linux tells the two cases apart:
- runnable with no free core: the run-queue delay, the second field of /proc/thread-self/schedstat
  (nanoseconds; present where the kernel keeps scheduler statistics). Too many busy processes or threads for
  the cores: fewer of them help.
- asleep: everything else. For a Python thread doing host work that is mostly the GIL, held by another thread
  of the process (a lock, a queue or a device sync that sleeps count here too). Less Python work in the
  process's other threads helps.
`time.thread_time()` gives the CPU seconds (user and system) on every platform; the run-queue delay is None
where schedstat is missing, and then only "not running" (wall − CPU) can be said.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

SCHEDSTAT = "/proc/thread-self/schedstat"


def _run_queue_seconds() -> float | None:
    """The calling thread's run-queue delay since it started, or None where the kernel does not say."""
    try:
        with open(SCHEDSTAT, "rb") as f:
            fields = f.read().split()
        return int(fields[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


@dataclass(frozen=True)
class ThreadTimes:
    """Seconds of one thread (wall, CPU, run-queue delay) and the CPU seconds of its whole process: readings
    from `thread_times()`, or the difference of two (`since`)."""

    wall: float
    cpu: float
    run_queue: float | None  # None: no scheduler statistics here
    process_cpu: float  # every thread of the process (not its child processes)

    def since(self, earlier: "ThreadTimes") -> "ThreadTimes":
        rq = None if self.run_queue is None or earlier.run_queue is None else self.run_queue - earlier.run_queue
        return ThreadTimes(self.wall - earlier.wall, self.cpu - earlier.cpu, rq, self.process_cpu - earlier.process_cpu)

    def __add__(self, other: "ThreadTimes") -> "ThreadTimes":
        rq = None if self.run_queue is None or other.run_queue is None else self.run_queue + other.run_queue
        return ThreadTimes(self.wall + other.wall, self.cpu + other.cpu, rq, self.process_cpu + other.process_cpu)

    def scaled(self, factor: float) -> "ThreadTimes":
        """Every figure × `factor` (per step, in ms: `factor` = 1e3 / steps)."""
        rq = None if self.run_queue is None else self.run_queue * factor
        return ThreadTimes(self.wall * factor, self.cpu * factor, rq, self.process_cpu * factor)

    @property
    def not_running(self) -> float:
        """Wall seconds the thread did not run (waiting for a core, or asleep)."""
        return max(0.0, self.wall - self.cpu)

    @property
    def asleep(self) -> float | None:
        """Wall seconds it was neither running nor runnable; None without the run-queue delay."""
        return None if self.run_queue is None else max(0.0, self.wall - self.cpu - self.run_queue)

    @property
    def other_threads_cpu(self) -> float:
        """CPU seconds the process's other threads used meanwhile (pin-memory, writer, compile threads...)."""
        return max(0.0, self.process_cpu - self.cpu)


ZERO = ThreadTimes(0.0, 0.0, 0.0, 0.0)


def thread_times() -> ThreadTimes:
    """A reading for the calling thread, now (only differences of two readings from one thread mean anything)."""
    return ThreadTimes(time.perf_counter(), time.thread_time(), _run_queue_seconds(), time.process_time())


def describe_not_running(times: ThreadTimes, ms_per_second: float) -> str:
    """'X ms not running: Y ms waiting for a free core, Z ms asleep (...)', every figure in seconds × `ms_per_second`
    (1e3 / batches for ms per batch; 1.0 for figures already in ms)."""
    text = f"{ms_per_second * times.not_running:.1f} ms not running"
    if times.run_queue is None:
        return text + " (the GIL held by another thread, or no free core; this kernel keeps no run-queue figures)"
    return (f"{text}: {ms_per_second * times.run_queue:.1f} ms waiting for a free core, "
            f"{ms_per_second * times.asleep:.1f} ms asleep (the GIL held by another thread of the process, or a "
            f"lock, queue or sync)")
